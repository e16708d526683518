//! Share-group workers (queues, docs/queues.md): [`ShareConsumer`] takes
//! records of a topic, each locked to it, and acknowledges them one by
//! one. Any number of them share the same partitions.

use std::time::Duration;

use super::client::{unexpected, Client};
use super::ClientError;
use crate::protocol::{
    DeleteShareGroupRequest, DescribeShareGroupRequest, DescribeShareGroupResponse, ErrorCode,
    ListShareGroupsRequest, RequestBody, ResponseBody, ShareAck, ShareAckKind, ShareAckRequest,
    ShareFetchRequest, ShareFetchResponse, ShareGroupListing, ShareRecord,
};

impl Client {
    async fn need_share(&self) -> Result<(), ClientError> {
        let v = self.protocol_version().await?;
        if v < 3 {
            return Err(ClientError::server(
                ErrorCode::UnsupportedVersion,
                format!("the server speaks protocol version {v}: share groups need version 3"),
            ));
        }
        Ok(())
    }

    /// Acquires records for a share group's member; the server holds the
    /// request up to `max_wait_ms` for one.
    pub async fn share_fetch(
        &self,
        r: ShareFetchRequest,
    ) -> Result<ShareFetchResponse, ClientError> {
        self.need_share().await?;
        let timeout = self
            .config()
            .request_timeout
            .saturating_add(Duration::from_millis(u64::from(r.max_wait_ms)));
        match self
            .call_with_timeout(&RequestBody::ShareFetch(r), timeout)
            .await?
        {
            ResponseBody::ShareFetch(r) => Ok(r),
            other => Err(unexpected("share_fetch", &other)),
        }
    }

    /// Acknowledges records; one code per ack (`none` when it counted).
    pub async fn share_ack(&self, r: ShareAckRequest) -> Result<Vec<ErrorCode>, ClientError> {
        self.need_share().await?;
        match self.call(&RequestBody::ShareAck(r)).await? {
            ResponseBody::ShareAck(r) => Ok(r.results),
            other => Err(unexpected("share_ack", &other)),
        }
    }

    pub async fn list_share_groups(&self) -> Result<Vec<ShareGroupListing>, ClientError> {
        self.need_share().await?;
        let body = RequestBody::ListShareGroups(ListShareGroupsRequest {});
        match self.call(&body).await? {
            ResponseBody::ListShareGroups(r) => Ok(r.groups),
            other => Err(unexpected("list_share_groups", &other)),
        }
    }

    pub async fn describe_share_group(
        &self,
        group: &str,
    ) -> Result<DescribeShareGroupResponse, ClientError> {
        self.need_share().await?;
        let body = RequestBody::DescribeShareGroup(DescribeShareGroupRequest {
            group: group.into(),
        });
        match self.call(&body).await? {
            ResponseBody::DescribeShareGroup(r) => Ok(r),
            other => Err(unexpected("describe_share_group", &other)),
        }
    }

    /// Deletes a share group with no active member (else `group_not_empty`).
    pub async fn delete_share_group(&self, group: &str) -> Result<(), ClientError> {
        self.need_share().await?;
        let body = RequestBody::DeleteShareGroup(DeleteShareGroupRequest {
            group: group.into(),
        });
        match self.call(&body).await? {
            ResponseBody::DeleteShareGroup(_) => Ok(()),
            other => Err(unexpected("delete_share_group", &other)),
        }
    }
}

/// How a [`ShareConsumer`] fetches.
#[derive(Debug, Clone)]
pub struct ShareConfig {
    /// Records per fetch.
    pub max_records: u32,
    /// How long the broker may hold a fetch waiting for a record.
    pub max_wait: Duration,
    /// Where the group starts on a partition it never read (its first
    /// start): the log start, else its end (Kafka's default).
    pub from_earliest: bool,
}

impl Default for ShareConfig {
    fn default() -> Self {
        ShareConfig {
            max_records: 1,
            max_wait: Duration::from_millis(500),
            from_earliest: false,
        }
    }
}

/// How a record was handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Accept,
    /// Deliver it again, not before `delay`; the reason is kept for a
    /// dead-letter record.
    Release {
        delay: Duration,
        reason: Option<String>,
    },
    /// To the dead-letter topic, with the reason.
    Reject {
        reason: String,
    },
}

/// One worker of a share group on one topic.
pub struct ShareConsumer {
    client: Client,
    group: String,
    topic: String,
    member_id: String,
    config: ShareConfig,
}

impl ShareConsumer {
    /// A worker with a member id of its own (random): locks are per member.
    pub fn new(client: Client, group: &str, topic: &str, config: ShareConfig) -> Self {
        ShareConsumer {
            client,
            group: group.into(),
            topic: topic.into(),
            member_id: format!("worker-{:016x}", fastrand::u64(..)),
            config,
        }
    }

    pub fn member_id(&self) -> &str {
        &self.member_id
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The records acquired for this worker (none after `max_wait`).
    pub async fn poll(&self) -> Result<Vec<ShareRecord>, ClientError> {
        self.poll_max(self.config.max_records).await
    }

    /// As [`poll`](Self::poll), at most `max_records` this time.
    pub async fn poll_max(&self, max_records: u32) -> Result<Vec<ShareRecord>, ClientError> {
        let r = self
            .client
            .share_fetch(ShareFetchRequest {
                group: self.group.clone(),
                topic: self.topic.clone(),
                member_id: self.member_id.clone(),
                max_records: max_records.max(1),
                max_wait_ms: u32::try_from(self.config.max_wait.as_millis()).unwrap_or(u32::MAX),
                from: Some(
                    if self.config.from_earliest {
                        "earliest"
                    } else {
                        "latest"
                    }
                    .into(),
                ),
            })
            .await?;
        Ok(r.records)
    }

    /// Acknowledges records (partition, offset, outcome); one code per
    /// record, `share_lock_lost` for one whose lock had lapsed.
    pub async fn ack(&self, acks: &[(u32, u64, Outcome)]) -> Result<Vec<ErrorCode>, ClientError> {
        if acks.is_empty() {
            return Ok(Vec::new());
        }
        let acks = acks
            .iter()
            .map(|(partition, offset, outcome)| {
                let (kind, delay_ms, error) = match outcome {
                    Outcome::Accept => (ShareAckKind::Accept, None, None),
                    Outcome::Release { delay, reason } => (
                        ShareAckKind::Release,
                        Some(u32::try_from(delay.as_millis()).unwrap_or(u32::MAX)),
                        reason.clone(),
                    ),
                    Outcome::Reject { reason } => {
                        (ShareAckKind::Reject, None, Some(reason.clone()))
                    }
                };
                ShareAck {
                    partition: *partition,
                    offset: *offset,
                    kind,
                    delay_ms,
                    error,
                }
            })
            .collect();
        self.client
            .share_ack(ShareAckRequest {
                group: self.group.clone(),
                topic: self.topic.clone(),
                member_id: self.member_id.clone(),
                acks,
            })
            .await
    }
}
