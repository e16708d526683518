//! [`Consumer`]: reads records from assigned partitions with long-poll
//! fetches, keeping one position per partition.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smol::Timer;

use super::accumulator::backoff;
use super::client::{check, Client, ClientConfig};
use super::error::ClientError;
use crate::batch::{BatchIter, HeadersRef, RecordRef};
use crate::protocol::{
    ErrorCode, FetchPartition, FetchPartitionResult, FetchRequest, FetchResponse, Isolation,
    OffsetSpec, FETCH_RESPONSE_ENVELOPE_BYTES_MAX,
};

/// Where a newly assigned partition starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    /// The first record still in the log.
    Earliest,
    /// Only records written from now on.
    Latest,
    Offset(u64),
    /// The first record at or after this time (ms since the Unix epoch);
    /// the end of the log when every record is older.
    Timestamp(i64),
}

impl std::str::FromStr for StartFrom {
    type Err = InvalidStartFrom;

    /// `earliest`, `latest`, an offset, or `@` and a Unix time in ms: the
    /// CLI's `--from`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "earliest" => Ok(Self::Earliest),
            "latest" => Ok(Self::Latest),
            _ => match s.strip_prefix('@') {
                Some(ms) => ms.parse().map(Self::Timestamp),
                None => s.parse().map(Self::Offset),
            }
            .map_err(|_| InvalidStartFrom(s.to_string())),
        }
    }
}

/// A `--from` value that is none of the forms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidStartFrom(pub String);

impl std::fmt::Display for InvalidStartFrom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "invalid start {:?}: use earliest, latest, an offset, or @UNIX_MS",
            self.0
        )
    }
}

impl std::error::Error for InvalidStartFrom {}

/// What to do when the position is outside the log: below the earliest
/// offset (the ring reused the segment) or above the high watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetReset {
    /// Go to the earliest offset: a consumer that fell behind a ring loses
    /// what was overwritten and carries on.
    Earliest,
    /// Go to the high watermark.
    Latest,
    /// Return the error from `poll`.
    Fail,
}

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// How long the server may hold a fetch waiting for data.
    pub max_wait: Duration,
    /// The server answers as soon as this many bytes are ready.
    pub min_bytes: u32,
    /// A soft cap on the bytes fetched per partition per poll.
    pub partition_max_bytes: u32,
    pub offset_reset: OffsetReset,
    /// How long `poll` keeps retrying a lost connection or a retriable
    /// error before it returns the error.
    pub retry_timeout: Duration,
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
    /// read_committed (the default) sees a transaction's records once it
    /// commits and never an aborted one's; on partitions without
    /// transactions it reads exactly what read_uncommitted does. See
    /// docs/semantics.md, "Transactions".
    pub isolation: Isolation,
    /// How [`Consumer::connect`] connects (TLS, timeouts).
    pub client: ClientConfig,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            max_wait: Duration::from_millis(500),
            min_bytes: 1,
            partition_max_bytes: 1024 * 1024,
            offset_reset: OffsetReset::Earliest,
            retry_timeout: Duration::from_secs(30),
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(1),
            isolation: Isolation::ReadCommitted,
            client: ClientConfig::default(),
        }
    }
}

/// One record read from a partition, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRecord {
    pub topic: Arc<str>,
    pub partition: u32,
    pub offset: u64,
    /// Milliseconds since the Unix epoch, as the producer stamped it.
    pub timestamp_ms: i64,
    pub key: Option<Vec<u8>>,
    /// Empty for a tombstone.
    pub value: Vec<u8>,
    /// The record has no value (CBOR null): it deletes its key from a
    /// compacted topic.
    pub tombstone: bool,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl ConsumerRecord {
    /// The record as a view, for code that handles both kinds.
    fn from_view(r: &RecordView<'_>) -> Self {
        Self {
            topic: r.topic.clone(),
            partition: r.partition,
            offset: r.offset,
            timestamp_ms: r.timestamp_ms,
            key: r.key.map(<[u8]>::to_vec),
            value: r.value.to_vec(),
            tombstone: r.tombstone,
            headers: r
                .headers
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_vec()))
                .collect(),
        }
    }
}

/// One record of a [`Polled`], borrowed from the batch it was fetched in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordView<'a> {
    pub topic: &'a Arc<str>,
    pub partition: u32,
    pub offset: u64,
    /// Milliseconds since the Unix epoch, as the producer stamped it.
    pub timestamp_ms: i64,
    pub key: Option<&'a [u8]>,
    /// Empty for a tombstone.
    pub value: &'a [u8],
    pub tombstone: bool,
    pub headers: HeadersRef<'a>,
}

impl RecordView<'_> {
    /// An owned copy.
    pub fn to_record(&self) -> ConsumerRecord {
        ConsumerRecord::from_view(self)
    }
}

/// The records of one [`Consumer::poll_batch`]: the fetched batches as
/// they arrived, checked (CRC, structure) before the poll returned, and
/// read in place: no copy and no allocation per record. They are views of
/// the response frame, which stays allocated (up to the connection's frame
/// size) while a `Polled` is kept: copy out ([`RecordView::to_record`])
/// what must outlive it.
#[derive(Debug, Default)]
pub struct Polled {
    parts: Vec<PolledPart>,
    len: usize,
}

#[derive(Debug)]
struct PolledPart {
    topic: Arc<str>,
    partition: u32,
    /// Records below it (early in the first batch) are left out.
    position: u64,
    /// Whole batches, checked.
    batches: crate::protocol::RecordBytes,
}

impl Polled {
    /// How many records [`iter`](Self::iter) yields.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The records in fetch order: partition by partition, each in offset
    /// order.
    pub fn iter(&self) -> PolledIter<'_> {
        PolledIter {
            parts: self.parts.iter(),
            part: None,
        }
    }
}

/// The records of a [`Polled`]. (Written out rather than as a chain of
/// `flat_map`s: skiff is built for size, and the closures were not
/// inlined.)
pub struct PolledIter<'a> {
    parts: std::slice::Iter<'a, PolledPart>,
    part: Option<(&'a PolledPart, CheckedRecords<'a>)>,
}

impl<'a> Iterator for PolledIter<'a> {
    type Item = RecordView<'a>;

    fn next(&mut self) -> Option<RecordView<'a>> {
        loop {
            if let Some((p, records)) = &mut self.part {
                if let Some((offset, timestamp_ms, r)) = records.next() {
                    return Some(RecordView {
                        topic: &p.topic,
                        partition: p.partition,
                        offset,
                        timestamp_ms,
                        key: r.key,
                        value: r.value.unwrap_or_default(),
                        tombstone: r.value.is_none(),
                        headers: r.headers,
                    });
                }
            }
            let p = self.parts.next()?;
            self.part = Some((p, checked_records(&p.batches, p.position)));
        }
    }
}

/// Reads assigned partitions. Positions live in the consumer only
/// (consumer groups with committed offsets come later).
pub struct Consumer {
    client: Client,
    config: ConsumerConfig,
    /// The next offset to read, per assigned partition.
    positions: BTreeMap<(Arc<str>, u32), u64>,
    /// The next fetch, sent before the last answer was decoded and handed
    /// over (as Kafka's fetcher does), so the broker reads and sends it
    /// while the caller works. Used only if it asks for the positions the
    /// next `poll` would ask for.
    prefetch: Option<Prefetch>,
    /// Which assigned partition (in `positions` order) leads the next
    /// fetch: the one after the last that returned records. The broker
    /// fills a fetch's byte budget in request order, so a fixed order
    /// would let one partition's backlog take every fetch while the
    /// others wait (Kafka's fetcher rotates for the same reason).
    first: usize,
    /// Bytes one fetch's entries may take in its answer besides records:
    /// what the server's frame holds beyond its largest batch (an answer's
    /// first batch may be that large). A fetch asks for as many partitions
    /// as fit, `first` leading, so every answer fits the frame; the rest
    /// wait for the next fetch.
    entries_room: usize,
    /// Positions moved by [`OffsetReset`] since [`Consumer::take_resets`]
    /// was last called: a group member commits from there. The last per
    /// partition, so a consumer that never asks keeps one each at most.
    resets: BTreeMap<(Arc<str>, u32), u64>,
}

type FetchFuture = Pin<Box<dyn Future<Output = Result<FetchResponse, ClientError>> + Send>>;

struct Prefetch {
    request: FetchRequest,
    answer: FetchFuture,
}

impl Consumer {
    pub fn new(client: Client, config: ConsumerConfig) -> Self {
        Self {
            client,
            config,
            positions: BTreeMap::new(),
            prefetch: None,
            first: 0,
            entries_room: usize::MAX,
            resets: BTreeMap::new(),
        }
    }

    pub async fn connect(addr: &str, config: ConsumerConfig) -> Result<Self, ClientError> {
        Ok(Self::new(
            Client::connect_with(addr, config.client.clone()).await?,
            config,
        ))
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Adds partitions of `topic` (all of them with `None`), starting at
    /// `from`. Assigning a partition again moves its position.
    pub async fn assign(
        &mut self,
        topic: &str,
        partitions: Option<&[u32]>,
        from: StartFrom,
    ) -> Result<(), ClientError> {
        let partitions: Vec<u32> = match partitions {
            Some(p) => p.to_vec(),
            None => (0..self.client.partition_count(topic).await?).collect(),
        };
        let topic: Arc<str> = topic.into();
        for p in partitions {
            let offset = match from {
                StartFrom::Offset(o) => o,
                StartFrom::Earliest => self.lookup(&topic, p, OffsetSpec::Earliest).await?,
                StartFrom::Latest => self.lookup(&topic, p, OffsetSpec::Latest).await?,
                StartFrom::Timestamp(ms) => {
                    match self
                        .client
                        .offset_for(&topic, p, OffsetSpec::Timestamp(ms))
                        .await?
                    {
                        Some(o) => o,
                        None => self.lookup(&topic, p, OffsetSpec::Latest).await?,
                    }
                }
            };
            self.positions.insert((topic.clone(), p), offset);
        }
        Ok(())
    }

    async fn lookup(
        &self,
        topic: &str,
        partition: u32,
        spec: OffsetSpec,
    ) -> Result<u64, ClientError> {
        self.client.offset_for(topic, partition, spec).await?.ok_or(
            ClientError::UnexpectedResponse {
                expected: "an offset for earliest/latest",
                got: "none",
            },
        )
    }

    /// Stops reading a partition.
    pub fn unassign(&mut self, topic: &str, partition: u32) {
        let key = (Arc::from(topic), partition);
        self.positions.remove(&key);
        self.resets.remove(&key);
    }

    /// Moves an assigned partition's position; `false` if not assigned.
    pub fn seek(&mut self, topic: &str, partition: u32, offset: u64) -> bool {
        match self.positions.get_mut(&(Arc::from(topic), partition)) {
            Some(p) => {
                *p = offset;
                true
            }
            None => false,
        }
    }

    /// The next offset `poll` reads from a partition.
    pub fn position(&self, topic: &str, partition: u32) -> Option<u64> {
        self.positions.get(&(Arc::from(topic), partition)).copied()
    }

    /// The partitions whose position an out-of-range offset moved (see
    /// [`OffsetReset`]) since the last call, with the new positions.
    pub fn take_resets(&mut self) -> Vec<(Arc<str>, u32, u64)> {
        std::mem::take(&mut self.resets)
            .into_iter()
            .map(|((topic, partition), at)| (topic, partition, at))
            .collect()
    }

    /// Every assigned partition and its position.
    pub fn assignment(&self) -> Vec<(Arc<str>, u32, u64)> {
        self.positions
            .iter()
            .map(|((t, p), o)| (t.clone(), *p, *o))
            .collect()
    }

    /// One fetch over every assigned partition: the records after each
    /// position, possibly none once `max_wait` passed. Lost connections and
    /// retriable errors are retried with backoff for `retry_timeout`.
    ///
    /// When an answer leaves a partition behind its high watermark, the
    /// fetch for what follows is sent before this one's records are decoded
    /// (the broker then answers it at once, since data is waiting); the next
    /// `poll` takes its answer, unless the positions were moved meanwhile.
    pub async fn poll(&mut self) -> Result<Vec<ConsumerRecord>, ClientError> {
        let polled = self.poll_batch().await?;
        Ok(polled.iter().map(|r| r.to_record()).collect())
    }

    /// [`poll`](Self::poll), with the records read in place from the
    /// fetched batches rather than copied out one by one: the fast way to
    /// read many small records.
    pub async fn poll_batch(&mut self) -> Result<Polled, ClientError> {
        let mut out = Polled::default();
        if self.positions.is_empty() {
            self.prefetch = None;
            return Ok(out);
        }
        // Known once connected; a failure here is the fetch's to retry.
        if let Ok(room) = self.client.fetch_entries_room().await {
            self.entries_room = room;
        }
        let request = self.request();
        let mut response = None;
        if let Some(p) = self.prefetch.take().filter(|p| p.request == request) {
            match p.answer.await {
                Ok(r) => response = Some(r),
                // Asked again below, with backoff.
                Err(e) if e.is_retriable() => log::debug!("prefetch failed ({e}); asking again"),
                Err(e) => return Err(e),
            }
        }
        let response = match response {
            Some(r) => r,
            None => self.fetch_retrying(&request).await?,
        };
        for (asked, result) in request.partitions.iter().zip(&response.partitions) {
            if result.topic != asked.topic || result.partition != asked.partition {
                return Err(ClientError::UnexpectedResponse {
                    expected: "fetch results in request order",
                    got: "a result for another partition",
                });
            }
        }
        // Whoever got records goes to the back of the next fetch.
        if let Some(last) = response
            .partitions
            .iter()
            .rposition(|r| !r.records.is_empty())
        {
            self.first = (self.first + last + 1) % self.positions.len();
        } else if request.partitions.len() < self.positions.len() {
            // The partitions left out of this fetch lead the next.
            self.first = (self.first + request.partitions.len()) % self.positions.len();
        }
        self.prefetch_after(&request, &response).await;
        // Positions move only when every partition's result is good, so an
        // error never drops records whose position already advanced.
        let mut moves = Vec::with_capacity(request.partitions.len());
        let mut resets = Vec::new();
        for (asked, result) in request.partitions.iter().zip(response.partitions) {
            let key = (Arc::<str>::from(asked.topic.as_str()), asked.partition);
            let Some(((topic, _), _)) = self.positions.get_key_value(&key) else {
                continue;
            };
            let topic = topic.clone();
            let reset = result.error == ErrorCode::OffsetOutOfRange;
            let next = self.settle(&topic, asked.offset, result, &mut out)?;
            if reset {
                resets.push(((topic, asked.partition), next));
            }
            moves.push((key, next));
        }
        self.positions.extend(moves);
        self.resets.extend(resets);
        Ok(out)
    }

    /// The fetch for every assigned partition from its position.
    fn request(&self) -> FetchRequest {
        self.request_from(|_, _, at| at)
    }

    /// The fetch for every assigned partition whose entry fits
    /// `entries_room`, at least one, `first` leading, from the offset
    /// `at(topic, partition, position)` gives.
    fn request_from(&self, at: impl Fn(&str, u32, u64) -> u64) -> FetchRequest {
        let lead = self.first % self.positions.len().max(1);
        let mut room = self
            .entries_room
            .saturating_sub(FETCH_RESPONSE_ENVELOPE_BYTES_MAX);
        let rotated = self
            .positions
            .iter()
            .skip(lead)
            .chain(self.positions.iter().take(lead))
            .enumerate()
            .take_while(|(i, ((topic, _), _))| {
                let need = FetchPartitionResult::envelope_bytes_max(topic, None);
                let fits = *i == 0 || need <= room;
                room = room.saturating_sub(need);
                fits
            })
            .map(|(_, entry)| entry);
        FetchRequest {
            partitions: rotated
                .map(|((topic, partition), &position)| FetchPartition {
                    topic: topic.to_string(),
                    partition: *partition,
                    offset: at(topic, *partition, position),
                    max_bytes: self.config.partition_max_bytes,
                })
                .collect(),
            max_wait_ms: u32::try_from(self.config.max_wait.as_millis()).unwrap_or(u32::MAX),
            min_bytes: self.config.min_bytes,
            isolation: Some(self.config.isolation),
        }
    }

    async fn fetch_retrying(&self, request: &FetchRequest) -> Result<FetchResponse, ClientError> {
        let started = Instant::now();
        let mut attempts = 0;
        loop {
            match self.client.fetch(request.clone()).await {
                Ok(r) => return Ok(r),
                Err(e) if e.is_retriable() && started.elapsed() < self.config.retry_timeout => {
                    attempts += 1;
                    log::debug!("fetch failed ({e}); retrying");
                    Timer::after(backoff(
                        attempts,
                        self.config.retry_backoff,
                        self.config.retry_backoff_max,
                    ))
                    .await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends the fetch that follows `response` if some partition has more
    /// waiting, with the positions its batch headers say come next. Only
    /// when every result is good: an error or a reset is settled first.
    async fn prefetch_after(&mut self, request: &FetchRequest, response: &FetchResponse) {
        let mut more = false;
        let mut next = HashMap::with_capacity(request.partitions.len());
        for (asked, result) in request.partitions.iter().zip(&response.partitions) {
            if result.error != ErrorCode::None {
                return;
            }
            let at = crate::batch::end_offset(&result.records)
                .map_or(asked.offset, |end| end.max(asked.offset))
                .max(result.next_offset.unwrap_or(0));
            let readable = match self.config.isolation {
                Isolation::ReadCommitted => {
                    result.last_stable_offset.unwrap_or(result.high_watermark)
                }
                Isolation::ReadUncommitted => result.high_watermark,
            };
            more |= at < readable;
            next.insert((asked.topic.as_str(), asked.partition), at);
        }
        if !more {
            return;
        }
        // In the order the next `poll` asks in (`first` has moved).
        let request = self.request_from(|topic, partition, position| {
            next.get(&(topic, partition)).copied().unwrap_or(position)
        });
        // Without a live connection the next poll reconnects: a prefetch
        // that did would hold the connection that poll asks for first.
        let Some(answer) = self.client.fetch_on_live_connection(request.clone()) else {
            return;
        };
        let mut answer: FetchFuture = Box::pin(answer);
        // Polled once, so the request is on its way before the caller
        // decodes this answer.
        if let Some(r) = futures_lite::future::poll_once(&mut answer).await {
            answer = Box::pin(async move { r });
        }
        self.prefetch = Some(Prefetch { request, answer });
    }

    /// Turns one partition's result into records; returns the new position.
    fn settle(
        &self,
        topic: &Arc<str>,
        position: u64,
        result: FetchPartitionResult,
        out: &mut Polled,
    ) -> Result<u64, ClientError> {
        if result.error == ErrorCode::OffsetOutOfRange {
            let where_ = format!(
                "{topic}/{}: offset {position} outside {}..={}",
                result.partition, result.earliest_offset, result.high_watermark
            );
            return match self.config.offset_reset {
                OffsetReset::Earliest => {
                    log::warn!("{where_}; resetting to earliest");
                    Ok(result.earliest_offset)
                }
                OffsetReset::Latest => {
                    log::warn!("{where_}; resetting to latest");
                    Ok(result.high_watermark)
                }
                OffsetReset::Fail => Err(ClientError::server(result.error, where_)),
            };
        }
        check(result.error, || {
            // The broker's reason when it sent one (brokers before the
            // field did not).
            result
                .message
                .clone()
                .unwrap_or_else(|| super::error::about(result.error, topic, Some(result.partition)))
        })?;
        let (next, records) = check_records(position, &result.records)?;
        if records > 0 {
            out.len += records;
            out.parts.push(PolledPart {
                topic: topic.clone(),
                partition: result.partition,
                position,
                batches: result.records,
            });
        }
        // Past batches a read_committed answer left out.
        Ok(next.max(result.next_offset.unwrap_or(0)))
    }
}

/// Checks fetched batches (CRC, then each record): returns the position
/// after the last batch and how many records lie at or after `position`.
fn check_records(position: u64, bytes: &[u8]) -> Result<(u64, usize), ClientError> {
    let mut next = position;
    let mut records = 0;
    for batch in BatchIter::new(bytes) {
        let batch = batch?;
        let h = batch.header;
        // Transaction markers: the broker's, never an application's.
        if !h.is_control() {
            for r in batch.record_refs() {
                records += usize::from(h.base_offset + u64::from(r?.offset_delta) >= position);
            }
        }
        next = next.max(h.next_offset());
    }
    Ok((next, records))
}

/// The records at or after `position` in batches [`check_records`] passed,
/// with their offsets and timestamps: CRCs are not computed again, and no
/// error can occur (one would end the records early).
fn checked_records(bytes: &[u8], position: u64) -> CheckedRecords<'_> {
    CheckedRecords {
        rest: bytes,
        position,
        batch: None,
    }
}

struct CheckedRecords<'a> {
    rest: &'a [u8],
    position: u64,
    batch: Option<(crate::batch::BatchHeader, crate::batch::RecordRefs<'a>)>,
}

impl<'a> Iterator for CheckedRecords<'a> {
    /// Offset, timestamp (ms), record.
    type Item = (u64, i64, RecordRef<'a>);

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((h, records)) = &mut self.batch {
                match records.next() {
                    Some(Ok(r)) => {
                        let offset = h.base_offset + u64::from(r.offset_delta);
                        if offset >= self.position {
                            return Some((offset, h.first_timestamp + r.timestamp_delta, r));
                        }
                        continue;
                    }
                    _ => self.batch = None,
                }
            }
            let header = crate::batch::parse_header(self.rest).ok()?;
            let bytes = self.rest.get(..header.total_len as usize)?;
            self.rest = &self.rest[bytes.len()..];
            // Transaction markers: the broker's, never an application's.
            if !header.is_control() {
                let batch = crate::batch::BatchView { header, bytes };
                self.batch = Some((header, batch.record_refs()));
            }
        }
    }
}

/// Appends the records at or after `position` from concatenated batches;
/// returns the position after the last batch.
#[cfg(test)]
fn decode_records(
    topic: &Arc<str>,
    partition: u32,
    position: u64,
    bytes: &[u8],
    out: &mut Vec<ConsumerRecord>,
) -> Result<u64, ClientError> {
    let (next, _) = check_records(position, bytes)?;
    let polled = Polled {
        parts: vec![PolledPart {
            topic: topic.clone(),
            partition,
            position,
            batches: bytes.to_vec().into(),
        }],
        len: 0,
    };
    out.extend(polled.iter().map(|r| r.to_record()));
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{BatchBuilder, ProducerStamp};

    fn batch_at(base: u64, values: &[&[u8]]) -> Vec<u8> {
        let mut b = BatchBuilder::new();
        for (i, v) in values.iter().enumerate() {
            b.push(1000 + i as i64, Some(b"k"), v, &[("h", b"1")]);
        }
        b.finish_with(ProducerStamp::NONE, base)
    }

    /// A peer that answers hello, and every fetch of `t`/0 with one batch
    /// of 10 records from the offset asked (each record's value is its
    /// offset), under a high watermark of 100. Reports each fetch's offset
    /// as it arrives. The first fetch at `hang_up_at` gets no answer: the
    /// peer closes that connection and serves the next.
    fn fetch_peer(hang_up_at: Option<u64>) -> (String, std::sync::mpsc::Receiver<u64>) {
        use crate::client::fake_peer::{answer, hello, take_request};
        use crate::protocol::{FetchResponse, RequestBody, ResponseBody};
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut hang_up_at = hang_up_at;
            'connections: for s in listener.incoming() {
                let mut s = s.unwrap();
                let (mut buf, mut chunk) = (Vec::new(), vec![0u8; 64 * 1024]);
                loop {
                    while let Some(request) = take_request(&mut buf) {
                        let body = match request.body {
                            RequestBody::Hello(_) => hello("fetch peer"),
                            RequestBody::Fetch(f) => {
                                let at = f.partitions[0].offset;
                                let _ = tx.send(at);
                                if hang_up_at.take_if(|h| *h == at).is_some() {
                                    continue 'connections;
                                }
                                let values: Vec<Vec<u8>> = (at..(at + 10).min(100))
                                    .map(|o| o.to_string().into())
                                    .collect();
                                let values: Vec<&[u8]> = values.iter().map(|v| &v[..]).collect();
                                ResponseBody::Fetch(FetchResponse {
                                    throttle_ms: None,
                                    partitions: vec![FetchPartitionResult {
                                        topic: "t".into(),
                                        partition: 0,
                                        error: ErrorCode::None,
                                        high_watermark: 100,
                                        earliest_offset: 0,
                                        records: batch_at(at, &values).into(),
                                        last_stable_offset: None,
                                        next_offset: None,
                                        message: None,
                                    }],
                                })
                            }
                            other => panic!("unexpected {}", other.name()),
                        };
                        answer(&mut s, request.correlation_id, body);
                    }
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            }
        });
        (addr, rx)
    }

    #[test]
    fn the_next_fetch_is_sent_before_poll_returns_and_dropped_after_a_seek() {
        let (addr, fetches) = fetch_peer(None);
        let wait = Duration::from_secs(10);
        smol::block_on(async {
            let mut c = Consumer::connect(&addr, ConsumerConfig::default())
                .await
                .unwrap();
            c.assign("t", Some(&[0]), StartFrom::Offset(0))
                .await
                .unwrap();
            let values = |rs: Vec<ConsumerRecord>| -> Vec<String> {
                rs.into_iter()
                    .map(|r| String::from_utf8(r.value).unwrap())
                    .collect()
            };
            let got = values(c.poll().await.unwrap());
            assert_eq!(got.first().map(String::as_str), Some("0"));
            assert_eq!(got.len(), 10);
            assert_eq!(fetches.recv_timeout(wait), Ok(0));
            assert_eq!(
                fetches.recv_timeout(wait),
                Ok(10),
                "the fetch after it is out while the caller holds the records"
            );
            // A seek makes the prefetched answer useless: it is dropped.
            assert!(c.seek("t", 0, 50));
            let got = values(c.poll().await.unwrap());
            assert_eq!(got[0], "50");
            assert_eq!(fetches.recv_timeout(wait), Ok(50));
            assert_eq!(fetches.recv_timeout(wait), Ok(60));
            // The prefetched answer serves the next poll: no fetch at 60 again.
            let got = values(c.poll().await.unwrap());
            assert_eq!(got[0], "60");
            assert_eq!(fetches.recv_timeout(wait), Ok(70));
            // At the high watermark nothing is fetched ahead: that fetch
            // would wait out max_wait on the server.
            assert!(c.seek("t", 0, 90));
            let got = values(c.poll().await.unwrap());
            assert_eq!((got[0].as_str(), got.len()), ("90", 10));
            assert_eq!(fetches.recv_timeout(wait), Ok(90));
            assert!(fetches.recv_timeout(Duration::from_millis(300)).is_err());
            assert_eq!(c.position("t", 0), Some(100));
        });
    }

    /// A prefetch lost with its connection is asked again: nothing is
    /// skipped and the error does not reach the caller.
    #[test]
    fn a_prefetch_lost_with_its_connection_is_asked_again() {
        let (addr, fetches) = fetch_peer(Some(10));
        let wait = Duration::from_secs(10);
        smol::block_on(async {
            let config = ConsumerConfig {
                retry_backoff: Duration::from_millis(1),
                ..ConsumerConfig::default()
            };
            let mut c = Consumer::connect(&addr, config).await.unwrap();
            c.assign("t", Some(&[0]), StartFrom::Offset(0))
                .await
                .unwrap();
            assert_eq!(c.poll().await.unwrap()[0].offset, 0);
            let got = c.poll().await.unwrap();
            assert_eq!(
                got.iter().map(|r| r.offset).collect::<Vec<_>>(),
                (10..20).collect::<Vec<_>>()
            );
            let seen: Vec<u64> = (0..4)
                .map(|_| fetches.recv_timeout(wait).unwrap())
                .collect();
            assert_eq!(seen, vec![0, 10, 10, 20], "the lost prefetch, asked again");
        });
    }

    /// A prefetch that finds its connection gone does not reconnect in a
    /// future that only the next poll drives: that future held the
    /// client's connection lock from its first poll, and the next poll,
    /// which asks for the connection before awaiting the prefetch, waited
    /// on it forever (a crash loop's consumer hung for an hour when the
    /// broker was killed between an answer and its prefetch).
    #[test]
    fn a_prefetch_after_its_connection_died_does_not_hold_up_the_next_poll() {
        use crate::client::fake_peer::{answer, hello, take_request};
        use crate::protocol::{FetchResponse, RequestBody, ResponseBody};
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (closed_tx, closed) = std::sync::mpsc::channel();
        // The first connection answers fetches at 0 and 10, then closes;
        // the second says nothing (the next poll's reconnect times out, so
        // the prefetch is what reconnects); the rest serve.
        std::thread::spawn(move || {
            let mut silent = Vec::new();
            for (n, s) in listener.incoming().enumerate() {
                let mut s = s.unwrap();
                if n == 1 {
                    silent.push(s);
                    continue;
                }
                std::thread::spawn({
                    let closed_tx = closed_tx.clone();
                    move || {
                        let (mut buf, mut chunk) = (Vec::new(), vec![0u8; 64 * 1024]);
                        loop {
                            while let Some(request) = take_request(&mut buf) {
                                let (body, last) = match request.body {
                                    RequestBody::Hello(_) => (hello("fetch peer"), false),
                                    RequestBody::Fetch(f) => {
                                        let at = f.partitions[0].offset;
                                        let values: Vec<Vec<u8>> =
                                            (at..at + 10).map(|o| o.to_string().into()).collect();
                                        let values: Vec<&[u8]> =
                                            values.iter().map(|v| &v[..]).collect();
                                        let body = ResponseBody::Fetch(FetchResponse {
                                            throttle_ms: None,
                                            partitions: vec![FetchPartitionResult {
                                                topic: "t".into(),
                                                partition: 0,
                                                error: ErrorCode::None,
                                                high_watermark: 1000,
                                                earliest_offset: 0,
                                                records: batch_at(at, &values).into(),
                                                last_stable_offset: None,
                                                next_offset: None,
                                                message: None,
                                            }],
                                        });
                                        (body, n == 0 && at == 10)
                                    }
                                    other => panic!("unexpected {}", other.name()),
                                };
                                answer(&mut s, request.correlation_id, body);
                                if last {
                                    drop(s);
                                    let _ = closed_tx.send(());
                                    return;
                                }
                            }
                            match s.read(&mut chunk) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                    }
                });
            }
        });
        let offsets = |rs: Vec<ConsumerRecord>| rs.iter().map(|r| r.offset).collect::<Vec<_>>();
        smol::block_on(async {
            let client = Client::connect_with(
                &addr,
                ClientConfig {
                    connect_timeout: Duration::from_millis(200),
                    ..ClientConfig::default()
                },
            )
            .await
            .unwrap();
            let mut c = Consumer::new(client.clone(), ConsumerConfig::default());
            c.assign("t", Some(&[0]), StartFrom::Offset(0))
                .await
                .unwrap();
            assert_eq!(
                offsets(c.poll().await.unwrap()),
                (0..10).collect::<Vec<_>>()
            );
            // The prefetch at 10 is answered, then the connection closes.
            closed.recv_timeout(Duration::from_secs(30)).unwrap();
            while client.connected().await {
                Timer::after(Duration::from_millis(1)).await;
            }
            assert_eq!(
                offsets(c.poll().await.unwrap()),
                (10..20).collect::<Vec<_>>()
            );
            // A bound only on a hang: the poll takes milliseconds.
            let next = futures_lite::future::or(async { Some(c.poll().await) }, async {
                Timer::after(Duration::from_secs(60)).await;
                None
            })
            .await
            .expect("the poll after a prefetch on a dead connection returns");
            assert_eq!(offsets(next.unwrap()), (20..30).collect::<Vec<_>>());
        });
    }

    #[test]
    fn start_from_parses_the_cli_forms() {
        assert_eq!("earliest".parse(), Ok(StartFrom::Earliest));
        assert_eq!("latest".parse(), Ok(StartFrom::Latest));
        assert_eq!("42".parse(), Ok(StartFrom::Offset(42)));
        assert_eq!(
            "@1700000000000".parse(),
            Ok(StartFrom::Timestamp(1_700_000_000_000))
        );
        for bad in ["", "@", "-1", "first", "@x"] {
            assert!(bad.parse::<StartFrom>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn records_below_the_position_are_skipped() {
        let mut bytes = batch_at(10, &[b"a", b"b", b"c"]);
        bytes.extend(batch_at(13, &[b"d"]));
        let topic: Arc<str> = "t".into();
        let mut out = Vec::new();
        let next = decode_records(&topic, 2, 11, &bytes, &mut out).unwrap();
        assert_eq!(next, 14);
        let got: Vec<(u64, &[u8])> = out.iter().map(|r| (r.offset, &r.value[..])).collect();
        assert_eq!(got, vec![(11, &b"b"[..]), (12, b"c"), (13, b"d")]);
        assert_eq!(out[0].timestamp_ms, 1001);
        assert_eq!(out[0].key.as_deref(), Some(&b"k"[..]));
        assert_eq!(out[0].headers, vec![("h".to_string(), b"1".to_vec())]);
        assert_eq!(out[0].partition, 2);
    }

    /// The log may hold gaps (compaction, transaction markers): records
    /// keep their own offsets, a position in a gap takes the next batch's
    /// records, and the next position is past each batch's whole extent,
    /// also where its last records were removed.
    #[test]
    fn records_across_gaps_keep_their_offsets() {
        let gapped = |base: u64, records: &[(u32, &[u8])], last: u32| {
            let mut b = BatchBuilder::new();
            let mut next = 0;
            for &(delta, v) in records {
                b.skip_offsets(delta - next);
                b.push(1000 + i64::from(delta), None, v, &[]);
                next = delta + 1;
            }
            b.skip_offsets(last + 1 - next);
            b.finish_with(ProducerStamp::NONE, base)
        };
        // Offsets 10 and 13 (11, 12, 14, 15 removed), then a gap to 30.
        let mut bytes = gapped(10, &[(0, b"a"), (3, b"b")], 5);
        bytes.extend(gapped(30, &[(1, b"c")], 1));
        let topic: Arc<str> = "t".into();
        for (position, want, next) in [
            (10, vec![(10, &b"a"[..]), (13, b"b"), (31, b"c")], 32),
            (12, vec![(13, &b"b"[..]), (31, b"c")], 32),
            (20, vec![(31, &b"c"[..])], 32),
        ] {
            let mut out = Vec::new();
            let got_next = decode_records(&topic, 0, position, &bytes, &mut out).unwrap();
            let got: Vec<(u64, &[u8])> = out.iter().map(|r| (r.offset, &r.value[..])).collect();
            assert_eq!((got, got_next), (want, next), "from {position}");
        }
        assert_eq!(
            crate::batch::end_offset(&bytes),
            Some(32),
            "the prefetch's position"
        );
    }

    #[test]
    fn empty_fetch_keeps_the_position_and_bad_bytes_fail() {
        let topic: Arc<str> = "t".into();
        let mut out = Vec::new();
        assert_eq!(decode_records(&topic, 0, 7, &[], &mut out).unwrap(), 7);
        let mut bytes = batch_at(7, &[b"a"]);
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(matches!(
            decode_records(&topic, 0, 7, &bytes, &mut out),
            Err(ClientError::Batch(_))
        ));
    }
}
