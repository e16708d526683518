//! [`Client`]: a handle on one pipelined connection, with typed calls.

use std::sync::Arc;
use std::time::Duration;

use smol::lock::Mutex;

use super::connection::{Address, Answer, Connection, ServerInfo};
use super::error::{about, ClientError};
use super::tls::{TlsClient, TlsOptions};
use crate::protocol::{
    CommittedOffset, DeleteGroupRequest, DescribeGroupRequest, DescribeGroupResponse, GroupListing,
    GroupPartition, HeartbeatRequest, JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest,
    ListGroupsRequest, OffsetCommitPartition, OffsetCommitRequest, OffsetFetchRequest,
    SyncGroupRequest, SyncGroupResponse,
};
use crate::protocol::{
    CreateTopicRequest, DeleteTopicRequest, DescribeTopicRequest, DescribeTopicResponse, ErrorCode,
    FetchRequest, FetchResponse, InitProducerRequest, InitProducerResponse, ListOffsetsPartition,
    ListOffsetsPartitionResult, ListOffsetsRequest, ListTopicsRequest, MetadataRequest, OffsetSpec,
    ProducePartition, ProducePartitionResult, ProduceRequest, ProducerIdEpoch, RequestBody,
    ResponseBody, TopicConfig, TopicMetadata,
};

/// How a [`Client`] connects and how long it waits.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Bound on connecting plus the hello exchange.
    pub connect_timeout: Duration,
    /// Bound on one request's answer; a fetch adds its `max_wait_ms`.
    /// `Duration::MAX`: no bound.
    pub request_timeout: Duration,
    /// Sent in hello, for the server's log.
    pub client_name: Option<String>,
    /// Connect over TLS with these options; `None`: plaintext.
    pub tls: Option<TlsOptions>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            client_name: Some(concat!("skiff-client/", env!("CARGO_PKG_VERSION")).to_string()),
            tls: None,
        }
    }
}

/// A connection to one server, shared by clones. Requests from any number
/// of tasks are pipelined on it. When the connection dies, the requests in
/// flight fail (with a retriable error) and the next call reconnects.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    addr: Address,
    config: ClientConfig,
    /// Built once from `config.tls`, so reconnects resume the TLS session.
    tls: Option<TlsClient>,
    /// The current connection; replaced when it dies. An async lock, so
    /// one caller reconnects while the others wait for its result.
    conn: Mutex<Option<Arc<Connection>>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.inner.addr)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to `addr` (`host:port`, or a Unix socket path: anything
    /// with a `/` or ending in `.sock`) and says hello.
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        Self::connect_with(addr, ClientConfig::default()).await
    }

    pub async fn connect_with(addr: &str, config: ClientConfig) -> Result<Self, ClientError> {
        let tls = config
            .tls
            .as_ref()
            .map(TlsClient::new)
            .transpose()
            .map_err(ClientError::tls_config)?;
        let client = Self {
            inner: Arc::new(Inner {
                addr: Address::parse(addr)?,
                tls,
                config,
                conn: Mutex::new(None),
            }),
        };
        client.connection().await?;
        Ok(client)
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The live connection, opening a new one if there is none or it died.
    async fn connection(&self) -> Result<Arc<Connection>, ClientError> {
        let mut slot = self.inner.conn.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_dead()) {
            return Ok(c.clone());
        }
        *slot = None;
        let c = Arc::new(
            Connection::open(
                &self.inner.addr,
                self.inner.tls.as_ref(),
                self.inner.config.client_name.clone(),
                self.inner.config.connect_timeout,
            )
            .await?,
        );
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Whether the client holds a live connection now.
    #[cfg(test)]
    pub(crate) async fn connected(&self) -> bool {
        let slot = self.inner.conn.lock().await;
        slot.as_ref().is_some_and(|c| !c.is_dead())
    }

    /// What the server said in hello on the current connection
    /// (reconnecting if needed).
    pub async fn server_info(&self) -> Result<ServerInfo, ClientError> {
        Ok(self.connection().await?.info.clone())
    }

    /// The protocol version the live connection's server speaks, read in
    /// place: [`Client::server_info`] copies the whole hello answer, and
    /// version checks run on every share fetch and group call.
    pub(crate) async fn protocol_version(&self) -> Result<u16, ClientError> {
        Ok(self.connection().await?.info.version)
    }

    /// The room a fetch's entries have beside its largest batch on the
    /// current connection (reconnecting if needed): read from its hello
    /// answer in place, since a consumer asks at every poll and
    /// [`Client::server_info`] would copy the whole answer each time.
    pub(crate) async fn fetch_entries_room(&self) -> Result<usize, ClientError> {
        let c = self.connection().await?;
        Ok((c.info.max_frame_bytes as usize).saturating_sub(c.info.max_batch_bytes as usize))
    }

    /// Sends one request and returns the answer body; error answers become
    /// [`ClientError::Server`]. No retry: callers decide.
    pub async fn call(&self, body: &RequestBody<'_>) -> Result<ResponseBody, ClientError> {
        self.call_with_timeout(body, self.inner.config.request_timeout)
            .await
    }

    pub(crate) async fn call_with_timeout(
        &self,
        body: &RequestBody<'_>,
        timeout: Duration,
    ) -> Result<ResponseBody, ClientError> {
        self.connection().await?.call(body, timeout).await
    }

    /// Creates a topic; returns its configuration with defaults filled in.
    pub async fn create_topic(
        &self,
        request: CreateTopicRequest,
    ) -> Result<TopicConfig, ClientError> {
        match self.call(&RequestBody::CreateTopic(request)).await? {
            ResponseBody::CreateTopic(r) => Ok(r.config),
            other => Err(unexpected("create_topic", &other)),
        }
    }

    pub async fn delete_topic(&self, name: &str) -> Result<(), ClientError> {
        let body = RequestBody::DeleteTopic(DeleteTopicRequest { name: name.into() });
        match self.call(&body).await? {
            ResponseBody::DeleteTopic(_) => Ok(()),
            other => Err(unexpected("delete_topic", &other)),
        }
    }

    /// Every topic name, sorted.
    pub async fn list_topics(&self) -> Result<Vec<String>, ClientError> {
        Ok(self.list_topics_full().await?.topics)
    }

    /// Every topic name, sorted, and the broker's disk budget and use.
    pub async fn list_topics_full(
        &self,
    ) -> Result<crate::protocol::ListTopicsResponse, ClientError> {
        match self
            .call(&RequestBody::ListTopics(ListTopicsRequest {}))
            .await?
        {
            ResponseBody::ListTopics(r) => Ok(r),
            other => Err(unexpected("list_topics", &other)),
        }
    }

    /// Compacts a compacted topic now; with `wait`, returns what each
    /// partition's compaction did once all are done (no request timeout:
    /// the cleaner's I/O cap sets the pace).
    pub async fn compact_topic(
        &self,
        name: &str,
        wait: bool,
    ) -> Result<Vec<crate::protocol::CompactedPartition>, ClientError> {
        let body = RequestBody::CompactTopic(crate::protocol::CompactTopicRequest {
            name: name.into(),
            wait,
        });
        let timeout = if wait {
            Duration::from_secs(24 * 3600)
        } else {
            self.inner.config.request_timeout
        };
        match self.call_with_timeout(&body, timeout).await? {
            ResponseBody::CompactTopic(r) => Ok(r.partitions),
            other => Err(unexpected("compact_topic", &other)),
        }
    }

    /// Changes a topic live; returns its configuration after the change.
    pub async fn alter_topic(
        &self,
        request: crate::protocol::AlterTopicRequest,
    ) -> Result<TopicConfig, ClientError> {
        match self.call(&RequestBody::AlterTopic(request)).await? {
            ResponseBody::AlterTopic(r) => Ok(r.config),
            other => Err(unexpected("alter_topic", &other)),
        }
    }

    /// Each partition's ring in detail (segments, bytes, oldest record,
    /// the next retention step).
    pub async fn describe_partitions(
        &self,
        name: &str,
    ) -> Result<Vec<crate::protocol::PartitionDetail>, ClientError> {
        let body = RequestBody::DescribePartitions(crate::protocol::DescribePartitionsRequest {
            name: name.into(),
        });
        match self.call(&body).await? {
            ResponseBody::DescribePartitions(r) => Ok(r.partitions),
            other => Err(unexpected("describe_partitions", &other)),
        }
    }

    pub async fn describe_topic(&self, name: &str) -> Result<DescribeTopicResponse, ClientError> {
        let body = RequestBody::DescribeTopic(DescribeTopicRequest { name: name.into() });
        match self.call(&body).await? {
            ResponseBody::DescribeTopic(r) => Ok(*r),
            other => Err(unexpected("describe_topic", &other)),
        }
    }

    /// Partitions and offsets of the named topics, or of all with `None`.
    pub async fn metadata(
        &self,
        topics: Option<&[&str]>,
    ) -> Result<Vec<TopicMetadata>, ClientError> {
        let body = RequestBody::Metadata(MetadataRequest {
            topics: topics.map(|t| t.iter().map(|s| s.to_string()).collect()),
        });
        match self.call(&body).await? {
            ResponseBody::Metadata(r) => Ok(r.topics),
            other => Err(unexpected("metadata", &other)),
        }
    }

    /// The number of partitions of one topic.
    pub async fn partition_count(&self, topic: &str) -> Result<u32, ClientError> {
        let topics = self.metadata(Some(&[topic])).await?;
        let t = topics.into_iter().find(|t| t.name == topic).ok_or(
            ClientError::UnexpectedResponse {
                expected: "metadata for the topic asked",
                got: "metadata without it",
            },
        )?;
        if !t.error.is_none() {
            return Err(ClientError::server(t.error, about(t.error, topic, None)));
        }
        Ok(t.partitions.len() as u32)
    }

    pub async fn list_offsets(
        &self,
        partitions: Vec<ListOffsetsPartition>,
    ) -> Result<Vec<ListOffsetsPartitionResult>, ClientError> {
        let n = partitions.len();
        let body = RequestBody::ListOffsets(ListOffsetsRequest { partitions });
        match self.call(&body).await? {
            ResponseBody::ListOffsets(r) if r.partitions.len() == n => Ok(r.partitions),
            other => Err(unexpected("list_offsets", &other)),
        }
    }

    /// One offset lookup; `None` for a timestamp after the last record.
    pub async fn offset_for(
        &self,
        topic: &str,
        partition: u32,
        spec: OffsetSpec,
    ) -> Result<Option<u64>, ClientError> {
        let mut r = self
            .list_offsets(vec![ListOffsetsPartition {
                topic: topic.into(),
                partition,
                spec,
            }])
            .await?;
        let r = r.remove(0);
        if !r.error.is_none() {
            // The broker's reason when it sent one (brokers before the
            // field did not).
            let message = r
                .message
                .unwrap_or_else(|| about(r.error, topic, Some(partition)));
            return Err(ClientError::server(r.error, message));
        }
        Ok(r.offset)
    }

    /// One fetch. The answer may take up to `max_wait_ms` longer than the
    /// request timeout allows otherwise.
    pub async fn fetch(&self, request: FetchRequest) -> Result<FetchResponse, ClientError> {
        let n = request.partitions.len();
        let timeout = self.fetch_timeout(&request);
        fetch_answer(
            n,
            self.call_with_timeout(&RequestBody::Fetch(request), timeout)
                .await,
        )
    }

    /// A fetch on the live connection, queued at the returned future's
    /// first poll, for an answer awaited later (the consumer's prefetch);
    /// `None` when no live connection is at hand. The future never takes
    /// the connection lock: reconnecting, it held the lock between polls,
    /// and a consumer asking for the connection before polling it again
    /// waited on itself forever.
    pub(crate) fn fetch_on_live_connection(
        &self,
        request: FetchRequest,
    ) -> Option<
        impl std::future::Future<Output = Result<FetchResponse, ClientError>> + Send + 'static,
    > {
        let conn = self
            .inner
            .conn
            .try_lock()?
            .as_ref()
            .filter(|c| !c.is_dead())?
            .clone();
        let timeout = self.fetch_timeout(&request);
        Some(async move {
            let n = request.partitions.len();
            fetch_answer(n, conn.call(&RequestBody::Fetch(request), timeout).await)
        })
    }

    /// The request timeout plus the fetch's own wait.
    fn fetch_timeout(&self, request: &FetchRequest) -> Duration {
        self.inner
            .config
            .request_timeout
            .saturating_add(Duration::from_millis(u64::from(request.max_wait_ms)))
    }

    /// Sends batches as they are (see [`crate::batch::BatchBuilder`]); one
    /// result per entry, in order. No batching, no retry: that is the
    /// [`Producer`](super::Producer)'s job.
    pub async fn produce_raw(
        &self,
        partitions: Vec<ProducePartition<'_>>,
    ) -> Result<Vec<ProducePartitionResult>, ClientError> {
        let body = RequestBody::Produce(ProduceRequest { partitions });
        self.queue_produce(&body, self.inner.config.request_timeout)
            .await?
            .wait()
            .await
    }

    /// Queues a produce request on the connection (as
    /// [`produce_raw`](Self::produce_raw) does, keeping the request so its
    /// batches can be sent again) and returns its answer to wait for
    /// apart: requests queued one after another go on the wire in that
    /// order. Unanswered after `timeout`, it fails with
    /// [`ClientError::Timeout`].
    pub(crate) async fn queue_produce(
        &self,
        body: &RequestBody<'_>,
        timeout: Duration,
    ) -> Result<QueuedProduce, ClientError> {
        let partitions = match body {
            RequestBody::Produce(p) => p.partitions.len(),
            _ => 0,
        };
        let conn = self.connection().await?;
        let (correlation_id, frame) = conn.encode(body)?;
        let answer = conn.queue_frame(correlation_id, frame, timeout).await?;
        Ok(QueuedProduce { answer, partitions })
    }

    /// Gets a producer id and epoch for idempotent produce.
    pub async fn init_producer(
        &self,
        producer_name: Option<&str>,
    ) -> Result<InitProducerResponse, ClientError> {
        self.init_producer_with(InitProducerRequest {
            producer_name: producer_name.map(str::to_string),
            renew: None,
        })
        .await
    }

    /// The next epoch for the anonymous producer `id` at `epoch` (after a
    /// batch it gave up on: its late requests are then fenced). A broker
    /// that does not renew anonymous producers hands out a fresh id.
    pub async fn renew_producer(
        &self,
        producer_id: u64,
        producer_epoch: u16,
    ) -> Result<InitProducerResponse, ClientError> {
        self.init_producer_with(InitProducerRequest {
            producer_name: None,
            renew: Some(ProducerIdEpoch {
                producer_id,
                producer_epoch,
            }),
        })
        .await
    }

    async fn init_producer_with(
        &self,
        request: InitProducerRequest,
    ) -> Result<InitProducerResponse, ClientError> {
        match self.call(&RequestBody::InitProducer(request)).await? {
            ResponseBody::InitProducer(r) => Ok(r),
            other => Err(unexpected("init_producer", &other)),
        }
    }
}

/// A produce request on the wire (see [`Client::queue_produce`]).
pub(crate) struct QueuedProduce {
    answer: Answer,
    partitions: usize,
}

impl QueuedProduce {
    /// The results, one per partition of the request, in its order.
    pub(crate) async fn wait(self) -> Result<Vec<ProducePartitionResult>, ClientError> {
        match self.answer.wait().await? {
            ResponseBody::Produce(r) if r.partitions.len() == self.partitions => Ok(r.partitions),
            other => Err(unexpected("produce", &other)),
        }
    }
}

/// Transaction calls (protocol version 3); see [`TxnProducer`](super::TxnProducer).
impl Client {
    async fn need_transactions(&self) -> Result<(), ClientError> {
        let v = self.protocol_version().await?;
        if v < 3 {
            return Err(ClientError::server(
                ErrorCode::UnsupportedVersion,
                format!("the server speaks protocol version {v}: transactions need version 3"),
            ));
        }
        Ok(())
    }

    /// Registers a transactional id; the answer's producer id and epoch
    /// fence every older instance.
    pub async fn init_txn(
        &self,
        transactional_id: &str,
        transaction_timeout_ms: u64,
    ) -> Result<crate::protocol::InitTxnResponse, ClientError> {
        self.need_transactions().await?;
        let body = RequestBody::InitTxn(crate::protocol::InitTxnRequest {
            transactional_id: transactional_id.to_owned(),
            transaction_timeout_ms,
        });
        match self.call(&body).await? {
            ResponseBody::InitTxn(r) => Ok(r),
            other => Err(unexpected("init_txn", &other)),
        }
    }

    pub async fn add_txn_offsets(
        &self,
        request: crate::protocol::AddTxnOffsetsRequest,
    ) -> Result<(), ClientError> {
        match self.call(&RequestBody::AddTxnOffsets(request)).await? {
            ResponseBody::AddTxnOffsets(_) => Ok(()),
            other => Err(unexpected("add_txn_offsets", &other)),
        }
    }

    /// Commits (or aborts) the open transaction; answers once durable.
    pub async fn end_txn(
        &self,
        transactional_id: &str,
        producer: (u64, u16),
        commit: bool,
    ) -> Result<(), ClientError> {
        let body = RequestBody::EndTxn(crate::protocol::EndTxnRequest {
            transactional_id: transactional_id.to_owned(),
            producer_id: producer.0,
            producer_epoch: producer.1,
            commit,
        });
        match self.call(&body).await? {
            ResponseBody::EndTxn(_) => Ok(()),
            other => Err(unexpected("end_txn", &other)),
        }
    }

    pub async fn list_txns(&self) -> Result<Vec<crate::protocol::TxnListing>, ClientError> {
        self.need_transactions().await?;
        match self
            .call(&RequestBody::ListTxns(crate::protocol::ListTxnsRequest {}))
            .await?
        {
            ResponseBody::ListTxns(r) => Ok(r.transactions),
            other => Err(unexpected("list_txns", &other)),
        }
    }
}

/// Consumer-group calls (protocol version 2); see [`GroupConsumer`](super::GroupConsumer)
/// for the member's life cycle built on them.
impl Client {
    /// Fails with a clear error on a server that has no groups (version 1).
    async fn need_groups(&self) -> Result<(), ClientError> {
        let v = self.protocol_version().await?;
        if v < 2 {
            return Err(ClientError::server(
                ErrorCode::UnsupportedVersion,
                format!("the server speaks protocol version {v}: consumer groups need version 2"),
            ));
        }
        Ok(())
    }

    /// Joins (or rejoins) a group; waits for the rebalance, so the answer
    /// may take up to the group's rebalance timeout.
    pub async fn join_group(&self, r: JoinGroupRequest) -> Result<JoinGroupResponse, ClientError> {
        self.need_groups().await?;
        let timeout = self
            .inner
            .config
            .request_timeout
            .saturating_add(Duration::from_millis(u64::from(r.rebalance_timeout_ms)));
        match self
            .call_with_timeout(&RequestBody::JoinGroup(r), timeout)
            .await?
        {
            ResponseBody::JoinGroup(r) => Ok(r),
            other => Err(unexpected("join_group", &other)),
        }
    }

    pub async fn sync_group(
        &self,
        group: &str,
        member_id: &str,
        generation: u32,
    ) -> Result<SyncGroupResponse, ClientError> {
        let body = RequestBody::SyncGroup(SyncGroupRequest {
            group: group.into(),
            member_id: member_id.into(),
            generation,
        });
        match self.call(&body).await? {
            ResponseBody::SyncGroup(r) => Ok(r),
            other => Err(unexpected("sync_group", &other)),
        }
    }

    pub async fn heartbeat(
        &self,
        group: &str,
        member_id: &str,
        generation: u32,
    ) -> Result<(), ClientError> {
        let body = RequestBody::Heartbeat(HeartbeatRequest {
            group: group.into(),
            member_id: member_id.into(),
            generation,
        });
        match self.call(&body).await? {
            ResponseBody::Heartbeat(_) => Ok(()),
            other => Err(unexpected("heartbeat", &other)),
        }
    }

    pub async fn leave_group(&self, group: &str, member_id: &str) -> Result<(), ClientError> {
        let body = RequestBody::LeaveGroup(LeaveGroupRequest {
            group: group.into(),
            member_id: member_id.into(),
        });
        match self.call(&body).await? {
            ResponseBody::LeaveGroup(_) => Ok(()),
            other => Err(unexpected("leave_group", &other)),
        }
    }

    /// Commits offsets; answered once durable. `member` is (member id,
    /// generation), or None for a group without members.
    pub async fn commit_offsets(
        &self,
        group: &str,
        member: Option<(&str, u32)>,
        offsets: Vec<OffsetCommitPartition>,
    ) -> Result<(), ClientError> {
        self.need_groups().await?;
        let body = RequestBody::OffsetCommit(OffsetCommitRequest {
            group: group.into(),
            member_id: member.map(|m| m.0.to_owned()),
            generation: member.map(|m| m.1),
            offsets,
        });
        match self.call(&body).await? {
            ResponseBody::OffsetCommit(_) => Ok(()),
            other => Err(unexpected("offset_commit", &other)),
        }
    }

    /// Committed offsets of a group (all of them with `None`).
    pub async fn fetch_offsets(
        &self,
        group: &str,
        partitions: Option<Vec<GroupPartition>>,
    ) -> Result<Vec<CommittedOffset>, ClientError> {
        self.need_groups().await?;
        let body = RequestBody::OffsetFetch(OffsetFetchRequest {
            group: group.into(),
            partitions,
        });
        match self.call(&body).await? {
            ResponseBody::OffsetFetch(r) => Ok(r.offsets),
            other => Err(unexpected("offset_fetch", &other)),
        }
    }

    pub async fn list_groups(&self) -> Result<Vec<GroupListing>, ClientError> {
        self.need_groups().await?;
        match self
            .call(&RequestBody::ListGroups(ListGroupsRequest {}))
            .await?
        {
            ResponseBody::ListGroups(r) => Ok(r.groups),
            other => Err(unexpected("list_groups", &other)),
        }
    }

    pub async fn describe_group(&self, group: &str) -> Result<DescribeGroupResponse, ClientError> {
        self.need_groups().await?;
        let body = RequestBody::DescribeGroup(DescribeGroupRequest {
            group: group.into(),
        });
        match self.call(&body).await? {
            ResponseBody::DescribeGroup(r) => Ok(*r),
            other => Err(unexpected("describe_group", &other)),
        }
    }

    pub async fn delete_group(&self, group: &str) -> Result<(), ClientError> {
        self.need_groups().await?;
        let body = RequestBody::DeleteGroup(DeleteGroupRequest {
            group: group.into(),
        });
        match self.call(&body).await? {
            ResponseBody::DeleteGroup(_) => Ok(()),
            other => Err(unexpected("delete_group", &other)),
        }
    }
}

impl Client {
    /// The mirror's link state and per-rule counters.
    pub async fn mirror_status(
        &self,
    ) -> Result<crate::protocol::MirrorStatusResponse, ClientError> {
        let body = RequestBody::MirrorStatus(crate::protocol::MirrorStatusRequest {});
        match self.call(&body).await? {
            ResponseBody::MirrorStatus(r) => Ok(*r),
            other => Err(unexpected("mirror_status", &other)),
        }
    }

    /// Pauses (`true`) or resumes a mirror rule.
    pub async fn mirror_pause(&self, rule: &str, paused: bool) -> Result<(), ClientError> {
        let body = RequestBody::MirrorPause(crate::protocol::MirrorRuleRequest {
            rule: rule.to_owned(),
            paused,
        });
        match self.call(&body).await? {
            ResponseBody::MirrorPause(_) => Ok(()),
            other => Err(unexpected("mirror_pause", &other)),
        }
    }
}

/// A fetch's answer, with a result for each of its `n` partitions.
fn fetch_answer(
    n: usize,
    answer: Result<ResponseBody, ClientError>,
) -> Result<FetchResponse, ClientError> {
    match answer? {
        ResponseBody::Fetch(r) if r.partitions.len() == n => Ok(r),
        other => Err(unexpected("fetch", &other)),
    }
}

pub(crate) fn unexpected(expected: &'static str, got: &ResponseBody) -> ClientError {
    ClientError::UnexpectedResponse {
        expected,
        got: got.name(),
    }
}

/// The error for a per-partition result code, `Ok` for `none`.
pub(crate) fn check(code: ErrorCode, what: impl FnOnce() -> String) -> Result<(), ClientError> {
    if code.is_none() {
        Ok(())
    } else {
        Err(ClientError::server(code, what()))
    }
}
