//! The outcome of one produced batch, shared by the [`Delivery`] of every
//! record in it: one allocation per batch, not a channel per record, which
//! matters at hundreds of thousands of small records a second.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use event_listener::{Event, EventListener};

use super::error::ClientError;

/// Where a produced record was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordMetadata {
    pub partition: u32,
    pub offset: u64,
    /// When the producer processed the broker's answer for the record's
    /// batch (one clock read per batch): send-to-ack latency without a
    /// clock read per record.
    pub acked_at: Instant,
}

/// `(partition, base offset)` of the batch once written, or why not.
type BatchResult = Result<(u32, u64), ClientError>;

/// Set once; every waiting delivery is woken then.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    result: OnceLock<(BatchResult, Instant)>,
    done: Event,
}

impl Outcome {
    /// Sets the result unless one is set already (the first one wins).
    fn settle(&self, result: BatchResult, at: Instant) {
        if self.result.set((result, at)).is_ok() {
            self.done.notify(usize::MAX);
        }
    }
}

/// The producer's side of an [`Outcome`]. Dropping it unsettled (the
/// producer went away with the batch) settles it with
/// [`ClientError::Closed`], so no delivery waits forever.
#[derive(Debug)]
pub(crate) struct Settler {
    outcome: Arc<Outcome>,
    /// Outcomes of records that were waiting for metadata before they
    /// joined this batch, with their index in it.
    linked: Vec<(u32, Arc<Outcome>)>,
    armed: bool,
}

impl Settler {
    pub fn new() -> Self {
        Self {
            outcome: Arc::default(),
            linked: Vec::new(),
            armed: true,
        }
    }

    /// An armed settler for an outcome handed over with
    /// [`disarm`](Self::disarm) that could not be linked after all.
    pub fn rearm(outcome: Arc<Outcome>) -> Self {
        Self {
            outcome,
            linked: Vec::new(),
            armed: true,
        }
    }

    /// A delivery for the record at `index` in this batch.
    pub fn delivery(&self, index: u32) -> Delivery {
        Delivery::waiting(self.outcome.clone(), index)
    }

    /// Makes the record at `index` settle `outcome` too.
    pub fn link(&mut self, index: u32, outcome: Arc<Outcome>) {
        self.linked.push((index, outcome));
    }

    pub fn settle(&self, result: BatchResult) {
        let now = Instant::now();
        for (index, o) in &self.linked {
            o.settle(
                result
                    .clone()
                    .map(|(p, base)| (p, base + u64::from(*index))),
                now,
            );
        }
        self.outcome.settle(result, now);
    }

    /// Hands the outcome over to be settled by another batch (see
    /// [`link`](Self::link)), without settling it on drop.
    pub fn disarm(mut self) -> Arc<Outcome> {
        self.armed = false;
        self.outcome.clone()
    }
}

impl Drop for Settler {
    fn drop(&mut self) {
        if self.armed {
            self.settle(Err(ClientError::Closed));
        }
    }
}

/// The outcome of one `send`: the record's partition and offset once the
/// server acknowledged it durably, or the error that ended its retries.
#[derive(Debug)]
pub struct Delivery {
    state: State,
}

#[derive(Debug)]
enum State {
    Done(Option<Result<RecordMetadata, ClientError>>),
    Waiting {
        outcome: Arc<Outcome>,
        index: u32,
        /// Registered only when polled before the outcome is set.
        listener: Option<EventListener>,
    },
}

impl Delivery {
    pub(crate) fn failed(e: ClientError) -> Self {
        Self {
            state: State::Done(Some(Err(e))),
        }
    }

    fn waiting(outcome: Arc<Outcome>, index: u32) -> Self {
        Self {
            state: State::Waiting {
                outcome,
                index,
                listener: None,
            },
        }
    }

    /// The result if it is known now, without waiting.
    pub fn try_result(&self) -> Option<Result<RecordMetadata, ClientError>> {
        match &self.state {
            State::Done(r) => r.clone(),
            State::Waiting { outcome, index, .. } => outcome.result.get().map(|r| at(r, *index)),
        }
    }
}

fn at((r, acked_at): &(BatchResult, Instant), index: u32) -> Result<RecordMetadata, ClientError> {
    r.clone().map(|(partition, base)| RecordMetadata {
        partition,
        offset: base + u64::from(index),
        acked_at: *acked_at,
    })
}

impl Future for Delivery {
    type Output = Result<RecordMetadata, ClientError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().state {
            State::Done(r) => Poll::Ready(r.take().unwrap_or(Err(ClientError::Closed))),
            State::Waiting {
                outcome,
                index,
                listener,
            } => loop {
                if let Some(r) = outcome.result.get() {
                    return Poll::Ready(at(r, *index));
                }
                match listener {
                    // Listen first, then check again: a settle in between
                    // is then seen either by the check or by the listener.
                    None => *listener = Some(outcome.done.listen()),
                    Some(l) => {
                        if Pin::new(l).poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                        *listener = None;
                    }
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_record_of_a_batch_gets_its_offset() {
        let s = Settler::new();
        let d0 = s.delivery(0);
        let d2 = s.delivery(2);
        assert!(d0.try_result().is_none());
        let before = Instant::now();
        s.settle(Ok((3, 100)));
        let r = smol::block_on(d2).unwrap();
        assert_eq!((r.partition, r.offset), (3, 102));
        assert!(r.acked_at >= before && r.acked_at <= Instant::now());
        let r0 = smol::block_on(d0).unwrap();
        assert_eq!(r0.offset, 100);
        assert_eq!(
            r0.acked_at, r.acked_at,
            "one answer, one ack time per batch"
        );
    }

    #[test]
    fn a_waiting_delivery_wakes_on_settle_from_another_thread() {
        let s = Settler::new();
        let d = s.delivery(1);
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            s.settle(Err(ClientError::Timeout));
        });
        assert!(matches!(smol::block_on(d), Err(ClientError::Timeout)));
        t.join().unwrap();
    }

    #[test]
    fn dropping_unsettled_closes_and_linked_records_follow() {
        let record = Settler::new();
        let d_record = record.delivery(0);
        let mut batch = Settler::new();
        batch.link(4, record.disarm());
        let d_batch = batch.delivery(0);
        drop(batch);
        assert!(matches!(smol::block_on(d_batch), Err(ClientError::Closed)));
        assert!(matches!(smol::block_on(d_record), Err(ClientError::Closed)));

        let record = Settler::new();
        let d_record = record.delivery(0);
        let mut batch = Settler::new();
        batch.link(4, record.disarm());
        batch.settle(Ok((0, 10)));
        assert_eq!(smol::block_on(d_record).unwrap().offset, 14);
    }

    #[test]
    fn the_first_result_wins() {
        let s = Settler::new();
        let d = s.delivery(0);
        s.settle(Ok((0, 5)));
        s.settle(Err(ClientError::Closed));
        drop(s);
        assert_eq!(smol::block_on(d).unwrap().offset, 5);
    }
}
