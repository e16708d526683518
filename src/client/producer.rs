//! [`Producer`]: batches records per partition and pipelines produce
//! requests, retrying retriable failures until a delivery timeout.
//!
//! `send` appends the record at once (under one short lock) and returns a
//! [`Delivery`] that resolves when the server acknowledged, or gave up on,
//! the record. A background task closes batches when they are full or have
//! lingered, sends every batch that may go in one produce request, and
//! handles answers: offsets to the waiting records, retriable failures back
//! into the queue with backoff, other failures to the records.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_listener::Event;
use smol::{Task, Timer};

use super::accumulator::{
    backoff, record_bytes_max, Accumulator, AccumulatorConfig, ReadyBatch, TopicPartition,
};
use super::client::{Client, ClientConfig, QueuedProduce};
use super::error::ClientError;
use super::outcome::Settler;
pub use super::outcome::{Delivery, RecordMetadata};
use super::partitioner::Partitioner;
use crate::batch::now_ms;
use crate::protocol::{
    ErrorCode, ProducePartition, ProducePartitionResult, ProduceRequest, RequestBody,
    FRAME_OVERHEAD_BYTES_MAX,
};

/// Tuning for a [`Producer`].
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// How long a batch waits for more records before it is sent.
    pub linger: Duration,
    /// A batch is sent once it reaches this size (capped by the server's
    /// `max_batch_bytes`). It also bounds a produce request: a full batch
    /// goes alone, so the broker works on it while the next arrive, and
    /// smaller batches of several partitions share a request up to it.
    pub batch_bytes: usize,
    /// Batches of one partition sent and not yet answered. Idempotent
    /// producers keep order with up to [`IDEMPOTENT_IN_FLIGHT_MAX`] (the
    /// cap); without idempotence only 1 keeps strict order across retries
    /// (see the ordering note in the accumulator).
    pub max_in_flight: usize,
    /// Records sent and not yet answered, over all partitions (`None`: no
    /// limit but `max_in_flight`). Records beyond it wait in the buffer,
    /// in batches that close where the waiting records make up a whole
    /// cap's worth, and go out as answers come back.
    pub max_in_flight_records: Option<usize>,
    /// How long a record may wait for its acknowledgement, retries and
    /// the request in flight included, before it fails with
    /// [`ClientError::Timeout`].
    pub delivery_timeout: Duration,
    /// The first retry backoff; it doubles up to `retry_backoff_max`.
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
    /// Bytes of records buffered and in flight; `send` fails with
    /// [`ClientError::BufferFull`] beyond it, `send_wait` waits.
    pub buffer_bytes: usize,
    pub partitioner: Partitioner,
    /// Idempotent produce (the default): the producer gets an id and epoch
    /// from the broker and stamps every batch with a per-partition
    /// sequence, so a retried batch is written once, across reconnects and
    /// broker restarts. `max_in_flight` is then capped at
    /// [`IDEMPOTENT_IN_FLIGHT_MAX`].
    pub idempotent: bool,
    /// A stable identity (like Kafka's `transactional.id`): the same name
    /// gets the same producer id with a new epoch, which fences every
    /// older instance (their batches fail with `fenced_producer`). `None`:
    /// a fresh anonymous id. Only with `idempotent`.
    pub producer_name: Option<String>,
    /// How [`Producer::connect`] connects (TLS, timeouts).
    pub client: ClientConfig,
    /// Told of each retriable failure a batch will be sent again after.
    pub on_retry: Option<RetryHook>,
}

/// Hears each retriable produce failure: the topic, the partition, the
/// error, and how long the batch's records have left before they fail.
#[derive(Clone)]
pub struct RetryHook(pub Arc<RetryFn>);

/// What a [`RetryHook`] calls.
pub type RetryFn = dyn Fn(&str, u32, &ClientError, Duration) + Send + Sync;

impl std::fmt::Debug for RetryHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RetryHook")
    }
}

/// The deepest per-partition pipeline the broker keeps ordered for an
/// idempotent producer: its sequence window (`broker::producers::
/// WINDOW_BATCHES`, checked equal by a test there), as Kafka's 5.
pub const IDEMPOTENT_IN_FLIGHT_MAX: usize = 5;

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            linger: Duration::from_millis(5),
            batch_bytes: 64 * 1024,
            max_in_flight: 5,
            max_in_flight_records: None,
            delivery_timeout: Duration::from_secs(120),
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(1),
            buffer_bytes: 32 * 1024 * 1024,
            partitioner: Partitioner::Default,
            idempotent: true,
            producer_name: None,
            client: ClientConfig::default(),
            on_retry: None,
        }
    }
}

/// A record whose topic's partition count is not known yet.
struct Unresolved {
    partition: Option<u32>,
    timestamp_ms: i64,
    key: Option<Vec<u8>>,
    /// None: a tombstone.
    value: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
    /// Settles the record's delivery; linked into its batch once the
    /// partition is known.
    settler: Settler,
    size: usize,
    enqueued: Instant,
}

enum TopicMeta {
    Known(u32),
    /// Metadata is being fetched; records wait here in send order.
    Pending(VecDeque<Unresolved>),
}

/// What the producer knows of each topic, with the last known topic looked
/// up kept aside: a producer usually sends to one topic, and hashing its
/// name for every record was a twentieth of the send path.
#[derive(Default)]
struct Topics {
    map: HashMap<Arc<str>, TopicMeta>,
    last_known: Option<(Arc<str>, u32)>,
}

impl Topics {
    /// The topic's shared name, and its partition count once known.
    fn lookup(&mut self, topic: &str) -> (Arc<str>, Option<u32>) {
        if let Some((t, n)) = &self.last_known {
            if &**t == topic {
                return (t.clone(), Some(*n));
            }
        }
        match self.map.get_key_value(topic) {
            Some((t, TopicMeta::Known(n))) => {
                self.last_known = Some((t.clone(), *n));
                (t.clone(), Some(*n))
            }
            Some((t, _)) => (t.clone(), None),
            None => (topic.into(), None),
        }
    }

    fn get(&self, topic: &str) -> Option<&TopicMeta> {
        self.map.get(topic)
    }

    fn get_mut(&mut self, topic: &str) -> Option<&mut TopicMeta> {
        self.last_known = None;
        self.map.get_mut(topic)
    }

    fn insert(&mut self, topic: Arc<str>, meta: TopicMeta) -> Option<TopicMeta> {
        self.last_known = None;
        self.map.insert(topic, meta)
    }

    fn remove(&mut self, topic: &str) -> Option<TopicMeta> {
        self.last_known = None;
        self.map.remove(topic)
    }
}

struct State {
    acc: Accumulator,
    topics: Topics,
    /// Bytes of records waiting for metadata, counted against the buffer.
    unresolved_bytes: usize,
    /// A stamped batch failed (given up on, or refused): the broker may
    /// never have written it, and its partition's next sequences would
    /// then be refused for good. Batches never sent wait until every batch
    /// sent has settled; then the producer takes a new epoch (a named one:
    /// any request still on its way is fenced) or a new id, and restamps
    /// them from sequence 0 (see `renew`).
    renew: bool,
}

struct Inner {
    client: Client,
    config: ProducerConfig,
    /// The batch bytes a produce request gathers at most (one batch larger
    /// than that goes alone): the batch size aimed at, within the server's
    /// frame limit less room for the CBOR around the batches.
    request_bytes_max: usize,
    state: Mutex<State>,
    /// Wakes the sender task: new records, answers, metadata.
    wake: Event,
    /// Wakes `flush` and `send_wait`: something completed.
    progress: Event,
    /// Held from taking batches out of the accumulator until their
    /// requests are queued on the connection, so that they reach the wire
    /// in the order their sequences were given. Two tasks draining at once
    /// on a multi-threaded executor otherwise queued theirs the other way
    /// round now and then; the broker refused the overtaking batch
    /// (`out_of_order_sequence`), and it waited out a retry backoff.
    send_order: smol::lock::Mutex<()>,
    /// An idempotent producer with an id of its own (not a transactional
    /// producer's): it renews it after a failed batch (`State::renew`).
    renews: bool,
    /// Records acknowledged but dropped by a topic's message-id window.
    duplicates: std::sync::atomic::AtomicU64,
}

/// Sends records in batches. Cheap to share behind an `Arc`; every method
/// takes `&self`. Dropping it stops the sender task; records still queued
/// then fail with [`ClientError::Closed`] (use [`flush`](Self::flush)
/// first).
pub struct Producer {
    inner: Arc<Inner>,
    _sender: Task<()>,
}

impl Producer {
    /// A producer over an existing client (sharing its connection).
    pub async fn new(client: Client, config: ProducerConfig) -> Result<Self, ClientError> {
        Self::with_id(client, config, None).await
    }

    /// A producer stamping its batches with a producer id and epoch the
    /// caller got (a transactional producer's, from `init_txn`).
    pub(crate) async fn with_id(
        client: Client,
        config: ProducerConfig,
        given: Option<(u64, u16)>,
    ) -> Result<Self, ClientError> {
        let info = client.server_info().await?;
        let batch_bytes_max = info.max_batch_bytes as usize;
        let (producer, max_in_flight) = if let Some(id) = given {
            (
                Some(id),
                config.max_in_flight.clamp(1, IDEMPOTENT_IN_FLIGHT_MAX),
            )
        } else if config.idempotent {
            // One id and epoch for the producer's life: kept across
            // reconnects, so a retry after a cut connection or a broker
            // restart is recognised.
            let r = client
                .init_producer(config.producer_name.as_deref())
                .await?;
            (
                Some((r.producer_id, r.producer_epoch)),
                config.max_in_flight.clamp(1, IDEMPOTENT_IN_FLIGHT_MAX),
            )
        } else {
            (None, config.max_in_flight.max(1))
        };
        let acc = Accumulator::new(AccumulatorConfig {
            batch_bytes_target: config.batch_bytes.min(batch_bytes_max),
            batch_bytes_max,
            linger: config.linger,
            max_in_flight,
            max_in_flight_records: config
                .max_in_flight_records
                .map_or(usize::MAX, |n| n.max(1)),
            buffer_bytes_max: config.buffer_bytes,
            producer,
        });
        let inner = Arc::new(Inner {
            client,
            // A full batch goes in a request of its own, so the broker
            // writes the first of a window while the next arrive (one
            // request per window left it idle until the whole window was
            // in); small batches share requests up to that size.
            request_bytes_max: config.batch_bytes.min(batch_bytes_max).min(
                (info.max_frame_bytes as usize).saturating_sub(FRAME_OVERHEAD_BYTES_MAX as usize),
            ),
            config,
            state: Mutex::new(State {
                acc,
                topics: Topics::default(),
                unresolved_bytes: 0,
                renew: false,
            }),
            wake: Event::new(),
            progress: Event::new(),
            send_order: smol::lock::Mutex::new(()),
            renews: given.is_none() && producer.is_some(),
            duplicates: std::sync::atomic::AtomicU64::new(0),
        });
        let sender = smol::spawn(run(inner.clone()));
        Ok(Self {
            inner,
            _sender: sender,
        })
    }

    /// Connects to `addr` and makes a producer.
    pub async fn connect(addr: &str, config: ProducerConfig) -> Result<Self, ClientError> {
        Self::new(
            Client::connect_with(addr, config.client.clone()).await?,
            config,
        )
        .await
    }

    /// As [`connect`](Self::connect), but a broker that is not there yet
    /// (not started, restarting, at its connection limit) is tried again,
    /// with the producer's backoff, until `config.delivery_timeout` has
    /// passed: the same patience its records get once it is connected. An
    /// attempt still hanging then (connecting, or waiting for hello's
    /// answer) ends with [`ClientError::Timeout`].
    /// `on_retry` hears each failure and the time left before giving up.
    pub async fn connect_retrying(
        addr: &str,
        config: ProducerConfig,
        mut on_retry: impl FnMut(&ClientError, Duration),
    ) -> Result<Self, ClientError> {
        let deadline = Instant::now() + config.delivery_timeout;
        let mut attempts = 0;
        loop {
            let attempt = async {
                let client = Client::connect_with(addr, config.client.clone()).await?;
                Self::new(client, config.clone()).await
            };
            // An attempt that hangs (a full accept queue, a broker that
            // accepts and never answers) ends at the deadline too, not
            // after its own connect timeout.
            let until_deadline = async {
                Timer::at(deadline).await;
                Err(ClientError::Timeout)
            };
            let e = match futures_lite::future::or(attempt, until_deadline).await {
                Ok(p) => return Ok(p),
                Err(e) => e,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if !e.is_retriable() || left.is_zero() {
                return Err(e);
            }
            on_retry(&e, left);
            attempts += 1;
            let pause = backoff(attempts, config.retry_backoff, config.retry_backoff_max);
            Timer::after(pause.min(left)).await;
        }
    }

    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    pub fn config(&self) -> &ProducerConfig {
        &self.inner.config
    }

    /// Records the broker acknowledged without writing them, because a
    /// topic's message-id window had seen their id (docs/semantics.md).
    pub fn duplicates_dropped(&self) -> u64 {
        self.inner
            .duplicates
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `topic`'s partition count, asked of the broker unless this producer
    /// knows it already, and kept: the first record sent to it then does
    /// not wait for a metadata round trip (Kafka's `partitionsFor`).
    pub async fn partitions_for(&self, topic: &str) -> Result<u32, ClientError> {
        let (topic, known) = self
            .inner
            .state
            .lock()
            .expect("producer state")
            .topics
            .lookup(topic);
        if let Some(n) = known {
            return Ok(n);
        }
        let (n, limit) = topic_layout(&self.inner.client, &topic).await?;
        if n > 0 {
            settle_topic(&self.inner, &topic, Ok((n, limit)));
            self.inner.wake.notify(1);
        }
        Ok(n)
    }

    /// The producer id and epoch the broker gave this producer, when it is
    /// idempotent: new ones after a failed batch (`State::renew`).
    pub fn producer_id(&self) -> Option<(u64, u16)> {
        self.inner
            .state
            .lock()
            .expect("producer state")
            .acc
            .producer()
    }

    /// Queues one record for `topic`; the partition comes from the
    /// partitioner. Never waits: a full buffer fails the delivery at once
    /// with [`ClientError::BufferFull`].
    pub fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&str, &[u8])],
    ) -> Delivery {
        self.enqueue(topic, None, key, Some(value), headers)
            .unwrap_or_else(Delivery::failed)
    }

    /// Queues a tombstone for `key` (a record without a value): on a
    /// compacted topic it deletes the key. `partition` as in
    /// [`send_to`](Self::send_to), or the key's.
    pub fn send_tombstone(&self, topic: &str, partition: Option<u32>, key: &[u8]) -> Delivery {
        self.enqueue(topic, partition, Some(key), None, &[])
            .unwrap_or_else(Delivery::failed)
    }

    /// As [`send`](Self::send), the value optional: a record copied as
    /// it is, a tombstone (no value) staying one, headers and all.
    pub fn send_copy(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, &[u8])],
    ) -> Delivery {
        self.enqueue(topic, None, key, value, headers)
            .unwrap_or_else(Delivery::failed)
    }

    /// As [`send`](Self::send), to a chosen partition.
    pub fn send_to(
        &self,
        topic: &str,
        partition: u32,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&str, &[u8])],
    ) -> Delivery {
        self.enqueue(topic, Some(partition), key, Some(value), headers)
            .unwrap_or_else(Delivery::failed)
    }

    /// As [`send`](Self::send), but waits for room in the buffer first, so
    /// a loop that sends faster than the server writes is slowed down
    /// instead of failed.
    pub async fn send_wait(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&str, &[u8])],
    ) -> Result<Delivery, ClientError> {
        self.enqueue_wait(topic, None, key, value, headers).await
    }

    /// As [`send_wait`](Self::send_wait), to a chosen partition.
    pub async fn send_wait_to(
        &self,
        topic: &str,
        partition: u32,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&str, &[u8])],
    ) -> Result<Delivery, ClientError> {
        self.enqueue_wait(topic, Some(partition), key, value, headers)
            .await
    }

    async fn enqueue_wait(
        &self,
        topic: &str,
        partition: Option<u32>,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&str, &[u8])],
    ) -> Result<Delivery, ClientError> {
        // Listen only once the buffer was full (a listener per record was
        // a fiftieth of the send path), then try again before waiting.
        let mut listener = None;
        loop {
            match self.enqueue(topic, partition, key, Some(value), headers) {
                Err(ClientError::BufferFull { .. }) => match listener.take() {
                    None => listener = Some(self.inner.progress.listen()),
                    Some(l) => l.await,
                },
                other => return other,
            }
        }
    }

    fn enqueue(
        &self,
        topic: &str,
        partition: Option<u32>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, &[u8])],
    ) -> Result<Delivery, ClientError> {
        let size = record_bytes_max(key, value.unwrap_or_default(), headers);
        let timestamp_ms = now_ms();
        // The owned copy a record needs while its topic's metadata is asked.
        let unresolved = |settler| Unresolved {
            partition,
            timestamp_ms,
            key: key.map(<[u8]>::to_vec),
            value: value.map(<[u8]>::to_vec),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_vec()))
                .collect(),
            settler,
            size,
            enqueued: Instant::now(),
        };
        let wake;
        let delivery;
        {
            let mut st = self.inner.state.lock().expect("producer state");
            let st = &mut *st;
            // The accumulator checks the record against the batch limit and
            // the buffer; records waiting for metadata count too.
            if st.unresolved_bytes > 0 {
                let total = st.acc.buffered_bytes() + st.unresolved_bytes;
                if total + size > self.inner.config.buffer_bytes {
                    return Err(ClientError::BufferFull {
                        buffered_bytes: total,
                        max: self.inner.config.buffer_bytes,
                    });
                }
            }
            // Against the server's limit: a topic's own is checked as
            // the record joins a batch.
            let max = st.acc.batch_bytes_max();
            st.acc.check_room(size, max)?;
            // One lookup on the hot path (a known topic).
            let (topic, known) = st.topics.lookup(topic);
            if let Some(n) = known {
                let p = match partition {
                    Some(p) if p >= n => {
                        return Err(ClientError::server(
                            ErrorCode::UnknownPartition,
                            format!("topic '{topic}' has no partition {p} (it has {n})"),
                        ))
                    }
                    Some(p) => p,
                    None => st
                        .acc
                        .choose_partition(&topic, key, n, self.inner.config.partitioner),
                };
                let tp = TopicPartition {
                    topic,
                    partition: p,
                };
                (delivery, wake) = st
                    .acc
                    .append(tp, timestamp_ms, key, value, headers, None, Instant::now)
                    .map_err(|(e, _)| e)?;
            } else {
                match st.topics.get_mut(&topic) {
                    Some(TopicMeta::Pending(q)) => {
                        let settler = Settler::new();
                        delivery = settler.delivery(0);
                        wake = false;
                        q.push_back(unresolved(settler));
                        st.unresolved_bytes += size;
                    }
                    Some(TopicMeta::Known(_)) => unreachable!("read above, under the same lock"),
                    None => {
                        let settler = Settler::new();
                        delivery = settler.delivery(0);
                        wake = false;
                        let q = VecDeque::from([unresolved(settler)]);
                        st.unresolved_bytes += size;
                        st.topics.insert(topic.clone(), TopicMeta::Pending(q));
                        smol::spawn(resolve_topic(self.inner.clone(), topic)).detach();
                    }
                }
            }
        }
        // Waking the sender for every record would cost a scan of every
        // partition per record; it only needs to know about new batches.
        if wake {
            self.inner.wake.notify(1);
        }
        Ok(delivery)
    }

    /// Sends every record sent before the call now (without waiting for
    /// linger) and waits until each of them is acknowledged or failed.
    /// Records sent meanwhile, from other tasks, are not waited for, so a
    /// busy producer's flush still returns.
    pub async fn flush(&self) {
        // Records still waiting for their topic's metadata join batches
        // once it arrives: let them, then mark.
        let mark = loop {
            let listener = self.inner.progress.listen();
            {
                let mut st = self.inner.state.lock().expect("producer state");
                if st.unresolved_bytes == 0 {
                    break st.acc.close_all();
                }
            }
            listener.await;
        };
        loop {
            let listener = self.inner.progress.listen();
            self.inner.wake.notify(1);
            {
                let st = self.inner.state.lock().expect("producer state");
                if !st.acc.unsettled_below(mark) {
                    return;
                }
            }
            listener.await;
        }
    }

    /// Flushes, then stops.
    pub async fn close(self) {
        self.flush().await;
    }
}

/// Fetches a topic's partition count and moves its waiting records into
/// batches; retries retriable failures until the oldest waiting record's
/// delivery timeout.
async fn resolve_topic(inner: Arc<Inner>, topic: Arc<str>) {
    let mut attempts = 0;
    loop {
        let result = topic_layout(&inner.client, &topic).await;
        let retry = settle_topic(&inner, &topic, result);
        inner.wake.notify(1);
        inner.progress.notify(usize::MAX);
        if !retry {
            return;
        }
        attempts += 1;
        let pause = backoff(
            attempts,
            inner.config.retry_backoff,
            inner.config.retry_backoff_max,
        );
        Timer::after(pause).await;
    }
}

/// A topic's partition count, and the largest batch it takes when that is
/// known: a partition's segment holds a batch of at most its size less the
/// segment header (docs/protocol.md, `batch_too_large`), and the metadata
/// answer does not carry it, so the topic's config is asked too. Without
/// it (a server that cannot say) the server's `max_batch_bytes` is used.
async fn topic_layout(client: &Client, topic: &str) -> Result<(u32, Option<usize>), ClientError> {
    let n = client.partition_count(topic).await?;
    let limit = match client.describe_topic(topic).await {
        Ok(d) => usize::try_from(d.config.segment_bytes)
            .ok()
            .map(|s| s.saturating_sub(crate::storage::segment::SEG_HEADER_BYTES)),
        Err(e) => {
            log::debug!("{topic}: no config ({e}); batches by the server's limit");
            None
        }
    };
    Ok((n, limit))
}

/// Applies a metadata answer to the records waiting for it. Returns whether
/// to ask again (a retriable failure within the delivery timeout).
fn settle_topic(
    inner: &Inner,
    topic: &Arc<str>,
    result: Result<(u32, Option<usize>), ClientError>,
) -> bool {
    let now = Instant::now();
    let mut st = inner.state.lock().expect("producer state");
    let st = &mut *st;
    let oldest = match st.topics.get(topic) {
        Some(TopicMeta::Pending(q)) => q.front().map(|u| u.enqueued),
        _ => None,
    };
    let expired = oldest.is_some_and(|t| now.duration_since(t) >= inner.config.delivery_timeout);
    let error = match result {
        Ok((0, _)) => ClientError::server(
            ErrorCode::UnknownTopic,
            format!("{topic} has no partitions"),
        ),
        Ok((n, limit)) => {
            if let Some(max) = limit {
                st.acc.limit_topic(topic, max);
            }
            let Some(TopicMeta::Pending(waiting)) =
                st.topics.insert(topic.clone(), TopicMeta::Known(n))
            else {
                return false;
            };
            for u in waiting {
                st.unresolved_bytes -= u.size;
                let partition = match u.partition {
                    Some(p) if p >= n => {
                        u.settler.settle(Err(ClientError::server(
                            ErrorCode::UnknownPartition,
                            format!("topic '{topic}' has no partition {p} (it has {n})"),
                        )));
                        continue;
                    }
                    Some(p) => p,
                    None => st.acc.choose_partition(
                        topic,
                        u.key.as_deref(),
                        n,
                        inner.config.partitioner,
                    ),
                };
                let headers: Vec<(&str, &[u8])> = u
                    .headers
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_slice()))
                    .collect();
                let tp = TopicPartition {
                    topic: topic.clone(),
                    partition,
                };
                // Linger and delivery timeout run from when it was sent.
                // The batch settles the record's own outcome when answered.
                if let Err((e, Some(linked))) = st.acc.append(
                    tp,
                    u.timestamp_ms,
                    u.key.as_deref(),
                    u.value.as_deref(),
                    &headers,
                    Some(u.settler.disarm()),
                    || u.enqueued,
                ) {
                    Settler::rearm(linked).settle(Err(e));
                }
            }
            return false;
        }
        Err(e) if e.is_retriable() && !expired => return true,
        Err(e) => e,
    };
    if let Some(TopicMeta::Pending(waiting)) = st.topics.remove(topic) {
        for u in waiting {
            st.unresolved_bytes -= u.size;
            u.settler.settle(Err(error.clone()));
        }
    }
    false
}

/// The sender task: drains ready batches into produce requests and sleeps
/// until the next linger or backoff ends or something changes.
async fn run(inner: Arc<Inner>) {
    loop {
        let listener = inner.wake.listen();
        let order = inner.send_order.lock().await;
        let now = Instant::now();
        let (batches, expired, wakeup, renew) = {
            let mut st = inner.state.lock().expect("producer state");
            let expired = st.acc.expire(now, inner.config.delivery_timeout);
            if !expired.is_empty() {
                // Closed batches: stamped.
                must_renew(&inner, &mut st);
            }
            let batches = st.acc.drain(now);
            let renew = st.renew && st.acc.sent_all_settled();
            let mut wakeup = st.acc.next_wakeup();
            if st.renew {
                // Held batches have no linger or retry instant: look again
                // soon, for the renewal and for their delivery timeouts.
                let soon = now + inner.config.retry_backoff;
                wakeup = Some(wakeup.map_or(soon, |w| w.min(soon)));
            }
            (batches, expired, wakeup, renew)
        };
        start_requests(&inner, batches).await;
        drop(order);
        if !expired.is_empty() {
            for b in expired {
                let e = match b.last_error {
                    Some(last) => ClientError::GaveUp {
                        after: inner.config.delivery_timeout,
                        last: Arc::new(last),
                    },
                    None => ClientError::Timeout,
                };
                b.settler.settle(Err(e));
            }
            inner.progress.notify(usize::MAX);
        }
        if renew {
            renew_producer(&inner).await;
            continue;
        }
        match wakeup {
            Some(at) => {
                futures_lite::future::or(listener, async {
                    Timer::at(at).await;
                })
                .await
            }
            None => listener.await,
        }
    }
}

/// A stamped batch failed: see `State::renew`.
fn must_renew(inner: &Inner, st: &mut State) {
    if inner.renews {
        st.renew = true;
        st.acc.hold_fresh();
    }
}

/// Takes the next epoch of the producer's id (every batch sent has
/// settled; a broker from before anonymous renewal gives an anonymous
/// producer a new id instead) and restamps the batches waiting; on
/// failure (the broker still away) waits a backoff, and the sender loop
/// tries again.
async fn renew_producer(inner: &Inner) {
    let current = inner.state.lock().expect("producer state").acc.producer();
    let answer = match (inner.config.producer_name.as_deref(), current) {
        (None, Some((id, epoch))) => inner.client.renew_producer(id, epoch).await,
        (name, _) => inner.client.init_producer(name).await,
    };
    match answer {
        Ok(r) => {
            let mut st = inner.state.lock().expect("producer state");
            st.acc.renew((r.producer_id, r.producer_epoch));
            st.renew = false;
            log::info!(
                "producer renewed as id {} epoch {} after a failed batch",
                r.producer_id,
                r.producer_epoch
            );
        }
        Err(e) => {
            log::debug!("renewing the producer failed ({e}); trying again");
            Timer::after(inner.config.retry_backoff).await;
        }
    }
}

/// Queues `batches` on the connection in as few produce requests as the
/// frame limit allows, in order, and leaves each request's answer to a
/// task of its own. The caller holds `send_order`. The frames are queued
/// before the caller goes on, to wake the owners of answered records, who
/// would otherwise run first and make the broker wait while they build
/// more.
async fn start_requests(inner: &Arc<Inner>, batches: Vec<ReadyBatch>) {
    let now = Instant::now();
    for batches in group_requests(batches, inner.request_bytes_max) {
        // A request outliving its oldest record's delivery timeout fails
        // then (Kafka's delivery.timeout.ms covers requests in flight), not
        // a request timeout later.
        let timeout = batches
            .iter()
            .filter_map(|b| b.created.checked_add(inner.config.delivery_timeout))
            .min()
            .map_or(Duration::MAX, |due| due.saturating_duration_since(now))
            .min(inner.client.config().request_timeout);
        // The request borrows the batches: a retry sends them again.
        let body = RequestBody::Produce(ProduceRequest {
            partitions: batches
                .iter()
                .map(|b| ProducePartition {
                    topic: b.tp.topic.to_string(),
                    partition: b.tp.partition,
                    batch: b.bytes[..].into(),
                })
                .collect(),
        });
        let queued = inner.client.queue_produce(&body, timeout).await;
        drop(body);
        smol::spawn(boxed_answer(inner.clone(), batches, queued)).detach();
    }
}

/// `answer_batches` behind a pointer, so that it can start requests itself
/// (its future would otherwise contain itself).
fn boxed_answer(
    inner: Arc<Inner>,
    batches: Vec<ReadyBatch>,
    queued: Result<QueuedProduce, ClientError>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(answer_batches(inner, batches, queued))
}

/// Splits batches into requests of at most `max_bytes` of batch data; a
/// request always takes at least one batch.
fn group_requests(batches: Vec<ReadyBatch>, max_bytes: usize) -> Vec<Vec<ReadyBatch>> {
    let mut out: Vec<Vec<ReadyBatch>> = Vec::new();
    let mut size = 0;
    for b in batches {
        match out.last_mut() {
            Some(last) if size + b.bytes.len() <= max_bytes => {
                size += b.bytes.len();
                last.push(b);
            }
            _ => {
                size = b.bytes.len();
                out.push(vec![b]);
            }
        }
    }
    out
}

/// Waits for one produce request's answer and settles each batch in it.
async fn answer_batches(
    inner: Arc<Inner>,
    batches: Vec<ReadyBatch>,
    queued: Result<QueuedProduce, ClientError>,
) {
    let answer = match queued {
        Ok(q) => q.wait().await,
        Err(e) => Err(e),
    };
    let outcomes: Vec<Result<(u64, u64), ClientError>> = match answer {
        Ok(results) => batches
            .iter()
            .zip(&results)
            .map(|(b, r)| {
                let o = outcome(b, r);
                if o.is_ok() && r.duplicate_records > 0 {
                    inner.duplicates.fetch_add(
                        u64::from(r.duplicate_records),
                        std::sync::atomic::Ordering::Relaxed,
                    );
                }
                o
            })
            .collect(),
        Err(e) => batches.iter().map(|_| Err(e.clone())).collect(),
    };
    let order = inner.send_order.lock().await;
    let now = Instant::now();
    // Settled after the lock is released: waking deliveries under it would
    // hold up `send` on other threads.
    let mut settled = Vec::with_capacity(batches.len());
    let mut retried = Vec::new();
    let (next, rewake) = {
        let mut st = inner.state.lock().expect("producer state");
        for (mut b, outcome) in batches.into_iter().zip(outcomes) {
            match outcome {
                Ok((base, _last)) => {
                    st.acc.complete(&b);
                    st.acc.recycle(&mut b);
                    let partition = b.tp.partition;
                    settled.push((b, Ok((partition, base))));
                }
                Err(e)
                    if (e.is_retriable()
                    // It overtook an earlier batch that is being retried
                    // or is still in flight: it goes again after it.
                    || (e.code() == Some(ErrorCode::OutOfOrderSequence)
                        && (b.sent_behind || st.acc.has_earlier(&b))))
                        && now.duration_since(b.created) < inner.config.delivery_timeout =>
                {
                    let pause = backoff(
                        b.attempts + 1,
                        inner.config.retry_backoff,
                        inner.config.retry_backoff_max,
                    );
                    log::debug!(
                        "produce to {}/{} failed ({e}); retry in {pause:?}",
                        b.tp.topic,
                        b.tp.partition
                    );
                    if inner.config.on_retry.is_some() {
                        let left = inner
                            .config
                            .delivery_timeout
                            .saturating_sub(now.duration_since(b.created));
                        retried.push((b.tp.clone(), e.clone(), left));
                    }
                    b.last_error = Some(e);
                    st.acc.retry(b, now + pause);
                }
                Err(e) => {
                    // Fenced: another instance of this name took over, and
                    // renewing would fence it in turn.
                    if e.code() != Some(ErrorCode::FencedProducer) {
                        must_renew(&inner, &mut st);
                    }
                    if matches!(
                        e.code(),
                        Some(ErrorCode::UnknownTopic | ErrorCode::UnknownPartition)
                    ) {
                        // The topic was deleted or recreated: ask again next time.
                        st.topics.remove(&b.tp.topic);
                    }
                    st.acc.complete(&b);
                    st.acc.recycle(&mut b);
                    // A broker refusal retried until the timeout ran out
                    // reads as the timeout, naming the refusal.
                    let e = match e {
                        ClientError::Server { .. } if e.is_retriable() => ClientError::GaveUp {
                            after: inner.config.delivery_timeout,
                            last: Arc::new(e),
                        },
                        e => e,
                    };
                    settled.push((b, Err(e)));
                }
            }
        }
        // The answers made room: batches waiting for it go out before the
        // records' owners are woken, so the broker works on them while the
        // owners make more.
        let next = st.acc.drain(now);
        // With every record sent, the sender task has nothing to send,
        // linger for or expire: waking it for every answer ran it twice
        // per request for a producer with one record in flight.
        (next, st.acc.holds_unsent())
    };
    start_requests(&inner, next).await;
    drop(order);
    if let Some(hook) = &inner.config.on_retry {
        for (tp, e, left) in retried {
            (hook.0)(&tp.topic, tp.partition, &e, left);
        }
    }
    for (b, result) in settled {
        b.settler.settle(result);
    }
    if rewake {
        inner.wake.notify(1);
    }
    inner.progress.notify(usize::MAX);
}

/// A batch's result, checked against the batch it answers.
fn outcome(batch: &ReadyBatch, r: &ProducePartitionResult) -> Result<(u64, u64), ClientError> {
    if *r.topic != *batch.tp.topic || r.partition != batch.tp.partition {
        return Err(ClientError::UnexpectedResponse {
            expected: "produce results in request order",
            got: "a result for another partition",
        });
    }
    let (base, last) = r.offsets().map_err(|code| {
        ClientError::server(
            code,
            r.message
                .clone()
                .unwrap_or_else(|| super::error::about(code, &r.topic, Some(r.partition))),
        )
    })?;
    // Offsets are dense within a batch: a range of another size would hand
    // records wrong offsets. The exception: a topic's message-id window
    // dropped `duplicate_records` of them (then the records after a dropped
    // one get offsets that are not theirs; docs/semantics.md).
    let written = last.checked_sub(base).map(|d| d + 1);
    let records = u64::from(batch.records);
    let dup = u64::from(r.duplicate_records);
    let dense = written == Some(records);
    let windowed = dup > 0 && (dup == records || written.map(|w| w + dup) == Some(records));
    if !dense && !windowed {
        return Err(ClientError::UnexpectedResponse {
            expected: "offsets for every record of the batch",
            got: "an offset range of another size",
        });
    }
    Ok((base, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(len: usize) -> ReadyBatch {
        ReadyBatch {
            tp: TopicPartition {
                topic: "t".into(),
                partition: 0,
            },
            seq: 0,
            bytes: vec![0; len].into(),
            records: 1,
            settler: Settler::new(),
            created: Instant::now(),
            attempts: 0,
            retry_at: None,
            reserved: len,
            sent_behind: false,
            last_error: None,
        }
    }

    /// A one-connection peer that answers hello and metadata (topic `t`,
    /// one partition) at once, and holds produce answers until the
    /// producer has sent nothing for `quiet`: everything sent by then went
    /// out without an answer. Returns the most records it held at once.
    fn holding_peer(quiet: Duration) -> (String, std::thread::JoinHandle<usize>) {
        use crate::client::fake_peer::{answer, hello, take_request};
        use crate::protocol::{
            ErrorResponse, MetadataResponse, PartitionMetadata, ProduceResponse, ResponseBody,
            TopicMetadata,
        };
        use std::io::{ErrorKind, Read};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let peer = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(quiet)).unwrap();
            let (mut buf, mut chunk) = (Vec::new(), vec![0u8; 64 * 1024]);
            // Per produce request: its correlation id and, per entry, the
            // topic, partition and record count.
            type Held = Vec<(u32, Vec<(String, u32, u32)>)>;
            let mut held: Held = Vec::new();
            let (mut next_offset, mut most) = (0u64, 0usize);
            loop {
                while let Some(request) = take_request(&mut buf) {
                    let id = request.correlation_id;
                    let body = match request.body {
                        RequestBody::Hello(_) => hello("holding peer"),
                        RequestBody::DescribeTopic(_) => ResponseBody::Error(ErrorResponse {
                            code: ErrorCode::InvalidRequest,
                            message: "not kept by this peer".into(),
                        }),
                        RequestBody::Metadata(_) => ResponseBody::Metadata(MetadataResponse {
                            topics: vec![TopicMetadata {
                                name: "t".into(),
                                error: ErrorCode::None,
                                partitions: vec![PartitionMetadata {
                                    partition: 0,
                                    error: ErrorCode::None,
                                    earliest_offset: 0,
                                    latest_offset: 0,
                                    message: None,
                                }],
                                message: None,
                            }],
                        }),
                        RequestBody::Produce(p) => {
                            let batches = p.partitions.iter().map(|e| {
                                let h = crate::batch::BatchView::new(&e.batch).unwrap().header;
                                (e.topic.clone(), e.partition, h.record_count)
                            });
                            held.push((id, batches.collect()));
                            let n = held.iter().flat_map(|(_, b)| b).map(|b| b.2 as usize);
                            most = most.max(n.sum());
                            continue;
                        }
                        other => panic!("unexpected {}", other.name()),
                    };
                    answer(&mut s, id, body);
                }
                match s.read(&mut chunk) {
                    Ok(0) => return most,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        for (id, batches) in held.drain(..) {
                            let partitions = batches
                                .into_iter()
                                .map(|(topic, partition, records)| {
                                    let base_offset = next_offset;
                                    next_offset += u64::from(records);
                                    ProducePartitionResult {
                                        topic,
                                        partition,
                                        error: ErrorCode::None,
                                        base_offset,
                                        last_offset: next_offset - 1,
                                        duplicate_records: 0,
                                        message: None,
                                    }
                                })
                                .collect();
                            answer(
                                &mut s,
                                id,
                                ResponseBody::Produce(ProduceResponse {
                                    partitions,
                                    throttle_ms: None,
                                }),
                            );
                        }
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        });
        (addr, peer)
    }

    #[test]
    fn records_beyond_the_in_flight_cap_wait_for_answers() {
        let (addr, peer) = holding_peer(Duration::from_millis(50));
        let offsets = smol::block_on(async {
            let producer = Producer::connect(
                &addr,
                ProducerConfig {
                    linger: Duration::ZERO,
                    batch_bytes: 1 << 20,
                    max_in_flight_records: Some(100),
                    idempotent: false,
                    ..ProducerConfig::default()
                },
            )
            .await
            .unwrap();
            let sent: Vec<Delivery> = (0..1000u32)
                .map(|i| producer.send("t", None, &i.to_le_bytes(), &[]))
                .collect();
            producer.flush().await;
            let mut offsets = Vec::new();
            for d in sent {
                offsets.push(d.await.unwrap().offset);
            }
            offsets
        });
        assert_eq!(offsets, (0..1000).collect::<Vec<u64>>(), "all, in order");
        assert_eq!(
            peer.join().unwrap(),
            100,
            "the peer held at most the cap, and the cap was reached"
        );
    }

    #[test]
    fn requests_are_split_by_size_and_never_empty() {
        let sizes = |g: &Vec<Vec<ReadyBatch>>| -> Vec<usize> { g.iter().map(Vec::len).collect() };
        let g = group_requests(vec![batch(40), batch(40), batch(40)], 100);
        assert_eq!(sizes(&g), vec![2, 1]);
        let g = group_requests(vec![batch(500), batch(10)], 100);
        assert_eq!(sizes(&g), vec![1, 1], "an oversized batch goes alone");
        assert!(group_requests(Vec::new(), 100).is_empty());
    }
}
