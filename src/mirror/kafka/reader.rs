//! Reading with read_committed semantics that do not depend on the
//! broker's list of aborted transactions.
//!
//! A Kafka broker answers a read_committed fetch with the records up to the
//! last stable offset and a list of aborted transactions the consumer must
//! skip. Tansu always sends that list empty, so its read_committed answers
//! carry aborted records. The transaction markers are in the log on every
//! broker, though: [`CommittedFilter`] holds each producer's transactional
//! records until its COMMIT or ABORT marker and drops what an ABORT closes.
//! That is correct on Apache Kafka too, where the list is merely redundant.
//!
//! Records come out in the order their transactions end (non-transactional
//! records at once); within one producer's transaction, in offset order.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::client::{Isolation, KafkaClient, OffsetSpec};
use super::error::KafkaError;
use super::records::{Batch, ControlKind, Record};

/// Fetch size per request of [`PartitionReader`].
const FETCH_MAX_BYTES: i32 = 1 << 20;
/// How long a fetch in [`PartitionReader::read_to_end`] waits. Data that is
/// there comes back at once; Tansu answers a fetch that may not wait at
/// all with nothing, so it must be allowed a little.
const END_FETCH_WAIT: Duration = Duration::from_millis(100);
/// The longest pause a broker's throttle may impose between two fetches:
/// a quota's throttle is seconds, and a larger value is a broken broker.
const THROTTLE_MAX: Duration = Duration::from_secs(60);

/// Buffers transactional records until their marker.
#[derive(Debug, Default)]
pub struct CommittedFilter {
    /// Producer id → its open transaction's records so far.
    open: HashMap<i64, Vec<Record>>,
    ready: VecDeque<Record>,
    /// The offset after the last batch pushed; batches before it (a fetch
    /// that starts inside a batch returns all of it) are skipped.
    next_offset: i64,
    /// Records dropped because an ABORT closed their transaction.
    aborted_records: u64,
}

impl CommittedFilter {
    /// A filter for a partition read from `offset` on.
    pub fn new(offset: i64) -> Self {
        Self {
            next_offset: offset,
            ..Self::default()
        }
    }

    /// Feeds one fetched batch.
    pub fn push(&mut self, batch: Batch) {
        if batch.next_offset() <= self.next_offset {
            return; // seen already
        }
        let from = self.next_offset;
        self.next_offset = batch.next_offset();
        if batch.control {
            match batch.control_kind() {
                Some(ControlKind::Commit) => {
                    if let Some(records) = self.open.remove(&batch.producer_id) {
                        self.ready.extend(records);
                    }
                }
                Some(ControlKind::Abort) => {
                    if let Some(records) = self.open.remove(&batch.producer_id) {
                        self.aborted_records += records.len() as u64;
                    }
                }
                None => {}
            }
            return;
        }
        let records = batch.records.into_iter().filter(|r| r.offset >= from);
        if batch.transactional {
            self.open
                .entry(batch.producer_id)
                .or_default()
                .extend(records);
        } else {
            self.ready.extend(records);
        }
    }

    /// The next record whose fate is known to be committed.
    pub fn pop(&mut self) -> Option<Record> {
        self.ready.pop_front()
    }

    /// Takes every committed record available.
    pub fn drain(&mut self) -> Vec<Record> {
        self.ready.drain(..).collect()
    }

    /// The offset the next fetch should start at.
    pub fn next_offset(&self) -> i64 {
        self.next_offset
    }

    /// Records held for transactions with no marker yet.
    pub fn pending_records(&self) -> usize {
        self.open.values().map(Vec::len).sum()
    }

    /// Records dropped because their transaction was aborted.
    pub fn aborted_records(&self) -> u64 {
        self.aborted_records
    }
}

/// Reads one partition with [`CommittedFilter`] applied.
#[derive(Debug)]
pub struct PartitionReader {
    client: KafkaClient,
    topic: String,
    partition: i32,
    filter: CommittedFilter,
    /// When the broker's last throttle ends; no fetch goes out before it.
    throttled_until: Option<Instant>,
}

impl PartitionReader {
    /// A reader of `topic`/`partition` from `offset`.
    pub fn new(client: KafkaClient, topic: &str, partition: i32, offset: i64) -> Self {
        Self {
            client,
            topic: topic.to_owned(),
            partition,
            filter: CommittedFilter::new(offset),
            throttled_until: None,
        }
    }

    /// A reader from the partition's earliest offset.
    pub async fn from_earliest(
        client: KafkaClient,
        topic: &str,
        partition: i32,
    ) -> Result<Self, KafkaError> {
        let offset = client
            .list_offset(
                topic,
                partition,
                OffsetSpec::Earliest,
                Isolation::ReadCommitted,
            )
            .await?;
        Ok(Self::new(client, topic, partition, offset))
    }

    pub fn filter(&self) -> &CommittedFilter {
        &self.filter
    }

    /// One read_committed fetch (waiting up to `max_wait` for data); the
    /// committed records it completed.
    pub async fn poll(&mut self, max_wait: Duration) -> Result<Vec<Record>, KafkaError> {
        self.fetch_once(max_wait).await?;
        Ok(self.filter.drain())
    }

    /// Every committed record up to the partition's current end (its last
    /// stable offset when the read starts). Transactions still open at the
    /// end stay held and come out of a later call.
    pub async fn read_to_end(&mut self) -> Result<Vec<Record>, KafkaError> {
        let end = self
            .client
            .list_offset(
                &self.topic,
                self.partition,
                OffsetSpec::Latest,
                Isolation::ReadCommitted,
            )
            .await?;
        while self.filter.next_offset() < end {
            let fetched = self.fetch_once(END_FETCH_WAIT).await?;
            // A throttled answer is empty because of the quota alone: ask
            // again once the throttle ends. Stopping there would leave the
            // rest unread, and the mirror would resume from an older
            // checkpoint and send its records twice.
            if fetched == 0 && self.throttled_until.is_none() {
                // Nothing more at this offset. Tansu's end offset is the
                // last batch's base offset + 1, short of the real end, so
                // the loop must not rely on reaching it exactly.
                break;
            }
        }
        Ok(self.filter.drain())
    }

    /// One fetch fed to the filter, sent once the broker's last throttle
    /// has ended; the number of batches it returned.
    async fn fetch_once(&mut self, max_wait: Duration) -> Result<usize, KafkaError> {
        if let Some(until) = self.throttled_until.take() {
            smol::Timer::at(until).await;
        }
        let fetched = self
            .client
            .fetch(
                &self.topic,
                self.partition,
                self.filter.next_offset(),
                FETCH_MAX_BYTES,
                max_wait,
                Isolation::ReadCommitted,
            )
            .await?;
        if !fetched.throttle.is_zero() {
            self.throttled_until = Some(Instant::now() + fetched.throttle.min(THROTTLE_MAX));
        }
        let mut count = 0;
        for batch in fetched.batches {
            if batch.next_offset() > self.filter.next_offset() {
                count += 1;
            }
            self.filter.push(batch);
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn record(offset: i64) -> Record {
        Record {
            offset,
            timestamp_ms: 0,
            key: None,
            value: Some(Bytes::from(offset.to_string())),
            headers: Vec::new(),
        }
    }

    fn data(producer_id: i64, transactional: bool, offsets: std::ops::Range<i64>) -> Batch {
        Batch {
            base_offset: offsets.start,
            last_offset_delta: (offsets.end - offsets.start - 1) as i32,
            partition_leader_epoch: 0,
            producer_id,
            producer_epoch: 0,
            base_sequence: 0,
            transactional,
            control: false,
            codec: 0,
            base_timestamp_ms: 0,
            max_timestamp_ms: 0,
            records: offsets.map(record).collect(),
        }
    }

    fn marker(producer_id: i64, offset: i64, kind: ControlKind) -> Batch {
        let kind = match kind {
            ControlKind::Abort => 0,
            ControlKind::Commit => 1,
        };
        let mut batch = data(producer_id, true, offset..offset + 1);
        batch.control = true;
        batch.records[0].key = Some(Bytes::from(vec![0, 0, 0, kind]));
        batch
    }

    fn offsets(records: &[Record]) -> Vec<i64> {
        records.iter().map(|r| r.offset).collect()
    }

    #[test]
    fn aborted_transactions_are_dropped_and_committed_ones_released() {
        let mut f = CommittedFilter::new(0);
        f.push(data(7, true, 0..3)); // producer 7, aborted below
        f.push(data(8, true, 3..5)); // producer 8, committed below
        f.push(data(9, false, 5..6)); // not transactional: at once
        assert_eq!(offsets(&f.drain()), vec![5]);
        assert_eq!(f.pending_records(), 5);
        f.push(marker(7, 6, ControlKind::Abort));
        assert_eq!(f.drain(), vec![]);
        f.push(data(7, true, 7..8));
        f.push(marker(8, 8, ControlKind::Commit));
        assert_eq!(offsets(&f.drain()), vec![3, 4]);
        f.push(marker(7, 9, ControlKind::Commit));
        assert_eq!(offsets(&f.drain()), vec![7]);
        assert_eq!(f.aborted_records(), 3);
        assert_eq!(f.pending_records(), 0);
        assert_eq!(f.next_offset(), 10);
    }

    #[test]
    fn batches_already_seen_or_partly_before_the_start_are_trimmed() {
        let mut f = CommittedFilter::new(2);
        f.push(data(1, false, 0..4)); // the fetch began inside this batch
        assert_eq!(offsets(&f.drain()), vec![2, 3]);
        f.push(data(1, false, 0..4)); // fetched again
        assert_eq!(f.drain(), vec![]);
        assert_eq!(f.next_offset(), 4);
    }

    /// A Kafka broker of one partition holding `batches`, on a thread,
    /// that answers the first `throttled` fetches as a broker over its
    /// fetch quota does (KIP-219): at once, with no data and a throttle
    /// time. Returns its address and, per fetch it answered, when.
    fn quota_broker(
        batches: Vec<Bytes>,
        end: i64,
        throttled: usize,
        throttle_ms: i32,
    ) -> (String, std::sync::mpsc::Receiver<Instant>) {
        use bytes::{BufMut, BytesMut};
        use kafka_protocol::messages::api_versions_response::ApiVersion;
        use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
        use kafka_protocol::messages::list_offsets_response::{
            ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
        };
        use kafka_protocol::messages::metadata_response::{
            MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
        };
        use kafka_protocol::messages::*;
        use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};
        use std::io::{Read, Write};

        fn answer<R: Encodable + HeaderVersion>(
            s: &mut std::net::TcpStream,
            correlation_id: i32,
            version: i16,
            response: &R,
        ) {
            let mut header = ResponseHeader::default();
            header.correlation_id = correlation_id;
            let mut body = BytesMut::new();
            header
                .encode(&mut body, R::header_version(version))
                .unwrap();
            response.encode(&mut body, version).unwrap();
            let mut frame = BytesMut::new();
            frame.put_i32(body.len() as i32);
            frame.extend_from_slice(&body);
            s.write_all(&frame).unwrap();
        }

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (fetched_tx, fetched) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut fetches = 0;
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { return };
                loop {
                    let mut prefix = [0; 4];
                    if s.read_exact(&mut prefix).is_err() {
                        break;
                    }
                    let mut body = vec![0; i32::from_be_bytes(prefix) as usize];
                    s.read_exact(&mut body).unwrap();
                    let mut body = Bytes::from(body);
                    let header =
                        kafka_protocol::protocol::decode_request_header_from_buffer(&mut body)
                            .unwrap();
                    let (id, version) = (header.correlation_id, header.request_api_version);
                    match header.request_api_key {
                        18 => {
                            let mut r = ApiVersionsResponse::default();
                            for (key, max) in [(18, 3), (3, 12), (2, 7), (1, 12)] {
                                let mut v = ApiVersion::default();
                                v.api_key = key;
                                v.max_version = max;
                                r.api_keys.push(v);
                            }
                            answer(&mut s, id, version, &r);
                        }
                        3 => {
                            let mut broker = MetadataResponseBroker::default();
                            broker.host = StrBytes::from_static_str("127.0.0.1");
                            broker.port = i32::from(addr.port());
                            let mut partition = MetadataResponsePartition::default();
                            partition.leader_id = BrokerId(0);
                            let mut topic = MetadataResponseTopic::default();
                            topic.name = Some(TopicName(StrBytes::from_static_str("cp")));
                            topic.partitions = vec![partition];
                            let mut r = MetadataResponse::default();
                            r.brokers = vec![broker];
                            r.topics = vec![topic];
                            answer(&mut s, id, version, &r);
                        }
                        2 => {
                            let request = ListOffsetsRequest::decode(&mut body, version).unwrap();
                            let mut p = ListOffsetsPartitionResponse::default();
                            p.offset = match request.topics[0].partitions[0].timestamp {
                                -2 => 0,
                                _ => end,
                            };
                            let mut t = ListOffsetsTopicResponse::default();
                            t.name = TopicName(StrBytes::from_static_str("cp"));
                            t.partitions = vec![p];
                            let mut r = ListOffsetsResponse::default();
                            r.topics = vec![t];
                            answer(&mut s, id, version, &r);
                        }
                        1 => {
                            let request = FetchRequest::decode(&mut body, version).unwrap();
                            let from = request.topics[0].partitions[0].fetch_offset;
                            let mut r = FetchResponse::default();
                            if fetches < throttled {
                                r.throttle_time_ms = throttle_ms;
                            } else {
                                let mut p = PartitionData::default();
                                p.high_watermark = end;
                                p.last_stable_offset = end;
                                let mut records = BytesMut::new();
                                for b in &batches {
                                    let base = i64::from_be_bytes(b[..8].try_into().unwrap());
                                    if base >= from {
                                        records.extend_from_slice(b);
                                        break; // one batch per answer
                                    }
                                }
                                p.records = Some(records.freeze());
                                let mut t = FetchableTopicResponse::default();
                                t.topic = TopicName(StrBytes::from_static_str("cp"));
                                t.partitions = vec![p];
                                r.responses = vec![t];
                            }
                            fetches += 1;
                            let _ = fetched_tx.send(Instant::now());
                            answer(&mut s, id, version, &r);
                        }
                        other => panic!("unexpected api {other}"),
                    }
                }
            }
        });
        (addr.to_string(), fetched)
    }

    /// Three one-record batches at offsets 0, 1 and 2.
    fn three_batches() -> Vec<Bytes> {
        use super::super::records::{BatchBuilder, Compression, ProducerStamp, RecordRef};
        (0..3i64)
            .map(|offset| {
                let mut b = BatchBuilder::new();
                let value = offset.to_string();
                b.push(&RecordRef {
                    key: None,
                    value: Some(value.as_bytes()),
                    timestamp_ms: 0,
                    headers: &[],
                })
                .unwrap();
                let batch = b.finish(Compression::None, ProducerStamp::NONE).unwrap();
                let mut batch = batch.to_vec();
                batch[..8].copy_from_slice(&offset.to_be_bytes());
                Bytes::from(batch)
            })
            .collect()
    }

    #[test]
    fn reading_to_the_end_waits_out_a_quota_throttle_instead_of_stopping() {
        let throttle = Duration::from_millis(150);
        let (addr, fetched) = quota_broker(three_batches(), 3, 2, 150);
        let records = smol::block_on(async {
            let client = KafkaClient::new(super::super::KafkaConfig::new(&addr).unwrap())?;
            let mut reader = PartitionReader::from_earliest(client, "cp", 0).await?;
            reader.read_to_end().await
        })
        .expect("read to the end");
        // Reading stopped at the first empty answer before: nothing, and
        // the mirror resumed from an older checkpoint.
        assert_eq!(offsets(&records), vec![0, 1, 2]);
        let at: Vec<Instant> = fetched.try_iter().collect();
        assert_eq!(at.len(), 5, "two throttled fetches, then one per batch");
        for pair in at[..3].windows(2) {
            assert!(
                pair[1] - pair[0] >= throttle,
                "a fetch went out {:?} into a {throttle:?} throttle",
                pair[1] - pair[0]
            );
        }
    }

    #[test]
    fn a_transaction_without_its_marker_stays_held() {
        let mut f = CommittedFilter::new(0);
        f.push(data(3, true, 0..2));
        assert_eq!(f.pop(), None);
        assert_eq!(f.pending_records(), 2);
    }
}
