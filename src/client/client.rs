//! [`Client`]: a handle on one pipelined connection, with typed calls.

use std::sync::Arc;
use std::time::Duration;

use smol::lock::Mutex;

use super::connection::{Address, Connection, ServerInfo};
use super::error::ClientError;
use crate::protocol::{
    CreateTopicRequest, DeleteTopicRequest, DescribeTopicRequest, DescribeTopicResponse, ErrorCode,
    FetchRequest, FetchResponse, InitProducerRequest, InitProducerResponse, ListOffsetsPartition,
    ListOffsetsPartitionResult, ListOffsetsRequest, ListTopicsRequest, MetadataRequest, OffsetSpec,
    ProducePartition, ProducePartitionResult, ProduceRequest, RequestBody, ResponseBody,
    TopicConfig, TopicMetadata,
};

/// How a [`Client`] connects and how long it waits.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Bound on connecting plus the hello exchange.
    pub connect_timeout: Duration,
    /// Bound on one request's answer; a fetch adds its `max_wait_ms`.
    pub request_timeout: Duration,
    /// Sent in hello, for the server's log.
    pub client_name: Option<String>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            client_name: Some(concat!("skiff-client/", env!("CARGO_PKG_VERSION")).to_string()),
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
        let client = Self {
            inner: Arc::new(Inner {
                addr: Address::parse(addr)?,
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
                self.inner.config.client_name.clone(),
                self.inner.config.connect_timeout,
            )
            .await?,
        );
        *slot = Some(c.clone());
        Ok(c)
    }

    /// What the server said in hello on the current connection
    /// (reconnecting if needed).
    pub async fn server_info(&self) -> Result<ServerInfo, ClientError> {
        Ok(self.connection().await?.info.clone())
    }

    /// Sends one request and returns the answer body; error answers become
    /// [`ClientError::Server`]. No retry: callers decide.
    pub async fn call(&self, body: &RequestBody) -> Result<ResponseBody, ClientError> {
        self.call_with_timeout(body, self.inner.config.request_timeout)
            .await
    }

    async fn call_with_timeout(
        &self,
        body: &RequestBody,
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
        match self
            .call(&RequestBody::ListTopics(ListTopicsRequest {}))
            .await?
        {
            ResponseBody::ListTopics(r) => Ok(r.topics),
            other => Err(unexpected("list_topics", &other)),
        }
    }

    pub async fn describe_topic(&self, name: &str) -> Result<DescribeTopicResponse, ClientError> {
        let body = RequestBody::DescribeTopic(DescribeTopicRequest { name: name.into() });
        match self.call(&body).await? {
            ResponseBody::DescribeTopic(r) => Ok(r),
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
            return Err(ClientError::server(t.error, format!("topic {topic}")));
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
            return Err(ClientError::server(r.error, format!("{topic}/{partition}")));
        }
        Ok(r.offset)
    }

    /// One fetch. The answer may take up to `max_wait_ms` longer than the
    /// request timeout allows otherwise.
    pub async fn fetch(&self, request: FetchRequest) -> Result<FetchResponse, ClientError> {
        let n = request.partitions.len();
        let timeout = self.inner.config.request_timeout
            + Duration::from_millis(u64::from(request.max_wait_ms));
        match self
            .call_with_timeout(&RequestBody::Fetch(request), timeout)
            .await?
        {
            ResponseBody::Fetch(r) if r.partitions.len() == n => Ok(r),
            other => Err(unexpected("fetch", &other)),
        }
    }

    /// Sends batches as they are (see [`crate::batch::BatchBuilder`]); one
    /// result per entry, in order. No batching, no retry: that is the
    /// [`Producer`](super::Producer)'s job.
    pub async fn produce_raw(
        &self,
        partitions: Vec<ProducePartition>,
    ) -> Result<Vec<ProducePartitionResult>, ClientError> {
        let n = partitions.len();
        let body = RequestBody::Produce(ProduceRequest { partitions });
        match self.call(&body).await? {
            ResponseBody::Produce(r) if r.partitions.len() == n => Ok(r.partitions),
            other => Err(unexpected("produce", &other)),
        }
    }

    /// As [`produce_raw`](Self::produce_raw), keeping the request so its
    /// batches can be sent again.
    pub(crate) async fn produce_ref(
        &self,
        body: &RequestBody,
    ) -> Result<Vec<ProducePartitionResult>, ClientError> {
        let n = match body {
            RequestBody::Produce(p) => p.partitions.len(),
            _ => 0,
        };
        match self.call(body).await? {
            ResponseBody::Produce(r) if r.partitions.len() == n => Ok(r.partitions),
            other => Err(unexpected("produce", &other)),
        }
    }

    /// Gets a producer id and epoch for idempotent produce.
    pub async fn init_producer(
        &self,
        producer_name: Option<&str>,
    ) -> Result<InitProducerResponse, ClientError> {
        let body = RequestBody::InitProducer(InitProducerRequest {
            producer_name: producer_name.map(str::to_string),
        });
        match self.call(&body).await? {
            ResponseBody::InitProducer(r) => Ok(r),
            other => Err(unexpected("init_producer", &other)),
        }
    }
}

fn unexpected(expected: &'static str, got: &ResponseBody) -> ClientError {
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
