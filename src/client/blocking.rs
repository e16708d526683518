//! Synchronous wrappers for the CLI and tests: each call drives the async
//! one with `smol::block_on`. The connection's tasks run on smol's global
//! executor, so nothing else needs to poll them. Do not call these from
//! inside an async task: they block the thread.

use smol::block_on;

use super::consumer::{ConsumerConfig, ConsumerRecord, StartFrom};
use super::producer::{Delivery, ProducerConfig, RecordMetadata};
use super::{ClientConfig, ClientError, ServerInfo};
use crate::protocol::{
    CreateTopicRequest, DescribeTopicResponse, FetchRequest, FetchResponse, InitProducerResponse,
    ListOffsetsPartition, ListOffsetsPartitionResult, OffsetSpec, ProducePartition,
    ProducePartitionResult, TopicConfig, TopicMetadata,
};

/// A blocking [`super::Client`].
#[derive(Clone, Debug)]
pub struct Client(pub super::Client);

impl Client {
    pub fn connect(addr: &str) -> Result<Self, ClientError> {
        block_on(super::Client::connect(addr)).map(Self)
    }
    pub fn connect_with(addr: &str, config: ClientConfig) -> Result<Self, ClientError> {
        block_on(super::Client::connect_with(addr, config)).map(Self)
    }
    pub fn server_info(&self) -> Result<ServerInfo, ClientError> {
        block_on(self.0.server_info())
    }
    pub fn create_topic(&self, request: CreateTopicRequest) -> Result<TopicConfig, ClientError> {
        block_on(self.0.create_topic(request))
    }
    pub fn delete_topic(&self, name: &str) -> Result<(), ClientError> {
        block_on(self.0.delete_topic(name))
    }
    pub fn list_topics(&self) -> Result<Vec<String>, ClientError> {
        block_on(self.0.list_topics())
    }
    pub fn describe_topic(&self, name: &str) -> Result<DescribeTopicResponse, ClientError> {
        block_on(self.0.describe_topic(name))
    }
    pub fn metadata(&self, topics: Option<&[&str]>) -> Result<Vec<TopicMetadata>, ClientError> {
        block_on(self.0.metadata(topics))
    }
    pub fn partition_count(&self, topic: &str) -> Result<u32, ClientError> {
        block_on(self.0.partition_count(topic))
    }
    pub fn list_offsets(
        &self,
        partitions: Vec<ListOffsetsPartition>,
    ) -> Result<Vec<ListOffsetsPartitionResult>, ClientError> {
        block_on(self.0.list_offsets(partitions))
    }
    pub fn offset_for(
        &self,
        topic: &str,
        partition: u32,
        spec: OffsetSpec,
    ) -> Result<Option<u64>, ClientError> {
        block_on(self.0.offset_for(topic, partition, spec))
    }
    pub fn fetch(&self, request: FetchRequest) -> Result<FetchResponse, ClientError> {
        block_on(self.0.fetch(request))
    }
    pub fn produce_raw(
        &self,
        partitions: Vec<ProducePartition>,
    ) -> Result<Vec<ProducePartitionResult>, ClientError> {
        block_on(self.0.produce_raw(partitions))
    }
    pub fn init_producer(&self, name: Option<&str>) -> Result<InitProducerResponse, ClientError> {
        block_on(self.0.init_producer(name))
    }
}

/// A blocking [`super::Producer`]. `send` queues and returns at once; wait
/// on the [`Delivery`] with [`wait`] or call [`Producer::flush`].
pub struct Producer(pub super::Producer);

impl Producer {
    pub fn connect(addr: &str, config: ProducerConfig) -> Result<Self, ClientError> {
        block_on(super::Producer::connect(addr, config)).map(Self)
    }
    pub fn new(client: &Client, config: ProducerConfig) -> Result<Self, ClientError> {
        block_on(super::Producer::new(client.0.clone(), config)).map(Self)
    }
    pub fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&str, &[u8])],
    ) -> Delivery {
        self.0.send(topic, key, value, headers)
    }
    pub fn send_to(
        &self,
        topic: &str,
        partition: u32,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&str, &[u8])],
    ) -> Delivery {
        self.0.send_to(topic, partition, key, value, headers)
    }
    /// Waits for buffer room, then queues.
    pub fn send_wait(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&str, &[u8])],
    ) -> Result<Delivery, ClientError> {
        block_on(self.0.send_wait(topic, key, value, headers))
    }
    pub fn flush(&self) {
        block_on(self.0.flush())
    }
}

/// Blocks until a delivery resolves.
pub fn wait(delivery: Delivery) -> Result<RecordMetadata, ClientError> {
    block_on(delivery)
}

/// A blocking [`super::Consumer`].
pub struct Consumer(pub super::Consumer);

impl Consumer {
    pub fn connect(addr: &str, config: ConsumerConfig) -> Result<Self, ClientError> {
        block_on(super::Consumer::connect(addr, config)).map(Self)
    }
    pub fn new(client: &Client, config: ConsumerConfig) -> Self {
        Self(super::Consumer::new(client.0.clone(), config))
    }
    pub fn assign(
        &mut self,
        topic: &str,
        partitions: Option<&[u32]>,
        from: StartFrom,
    ) -> Result<(), ClientError> {
        block_on(self.0.assign(topic, partitions, from))
    }
    pub fn seek(&mut self, topic: &str, partition: u32, offset: u64) -> bool {
        self.0.seek(topic, partition, offset)
    }
    pub fn position(&self, topic: &str, partition: u32) -> Option<u64> {
        self.0.position(topic, partition)
    }
    pub fn poll(&mut self) -> Result<Vec<ConsumerRecord>, ClientError> {
        block_on(self.0.poll())
    }
}
