//! Share-group workers (queues, docs/queues.md): [`ShareConsumer`] takes
//! records of a topic, each locked to it, and acknowledges them one by
//! one. Any number of them share the same partitions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use smol::Timer;

use super::accumulator::backoff;
use super::client::{unexpected, Client};
use super::ClientError;
use crate::protocol::{
    DeleteShareGroupRequest, DescribeShareGroupRequest, DescribeShareGroupResponse, ErrorCode,
    ListShareGroupsRequest, RequestBody, ResponseBody, ShareAck, ShareAckKind, ShareAckRequest,
    ShareFetchRequest, ShareFetchResponse, ShareGroupListing, ShareLeaveRequest, ShareRecord,
};

/// The protocol version that has `share_leave`.
const SHARE_LEAVE_VERSION: u16 = 4;

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

    /// `member_id` leaves the share group: the records it holds are
    /// redelivered at once (their delivery counts as after a release), and
    /// it stops counting as active. Returns how many it held. Needs
    /// protocol version 4 (else `unsupported_version`).
    pub async fn share_leave(&self, group: &str, member_id: &str) -> Result<u64, ClientError> {
        let v = self.protocol_version().await?;
        if v < SHARE_LEAVE_VERSION {
            return Err(ClientError::server(
                ErrorCode::UnsupportedVersion,
                format!("the server speaks protocol version {v}: share_leave needs version {SHARE_LEAVE_VERSION}"),
            ));
        }
        let body = RequestBody::ShareLeave(ShareLeaveRequest {
            group: group.into(),
            member_id: member_id.into(),
        });
        match self.call(&body).await? {
            ResponseBody::ShareLeave(r) => Ok(r.released),
            other => Err(unexpected("share_leave", &other)),
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
    /// How long a poll the server refuses with a retriable code (or an
    /// acknowledgement so refused, or whose connection is lost) keeps
    /// asking again before it returns the refusal: `too_many_members`,
    /// while `share.max_active_members` others are active, lasts until
    /// one leaves or lapses (`lock_ms`). Zero: the first refusal is
    /// returned; [`Duration::MAX`]: it waits as long as the refusals do.
    /// Other errors are returned at once.
    pub retry_timeout: Duration,
    /// The first backoff between those asks; it doubles up to
    /// `retry_backoff_max`.
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
    /// Told once per poll or acknowledgement that starts waiting for a
    /// member slot (`too_many_members`), which is also logged at info.
    pub on_slot_wait: Option<SlotWaitHook>,
}

impl Default for ShareConfig {
    /// The retry bounds are [`ConsumerConfig`](super::ConsumerConfig)'s.
    fn default() -> Self {
        ShareConfig {
            max_records: 1,
            max_wait: Duration::from_millis(500),
            from_earliest: false,
            retry_timeout: Duration::from_secs(30),
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(1),
            on_slot_wait: None,
        }
    }
}

/// Hears that a [`ShareConsumer`]'s poll waits for a member slot, with
/// the refusal.
#[derive(Clone)]
pub struct SlotWaitHook(pub Arc<dyn Fn(&ClientError) + Send + Sync>);

impl std::fmt::Debug for SlotWaitHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SlotWaitHook")
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

    /// The records acquired for this worker (none after `max_wait`). A
    /// retriable refusal (no member slot free, say) is asked again with
    /// backoff for up to `retry_timeout`.
    pub async fn poll(&self) -> Result<Vec<ShareRecord>, ClientError> {
        self.poll_max(self.config.max_records).await
    }

    /// As [`poll`](Self::poll), at most `max_records` this time.
    pub async fn poll_max(&self, max_records: u32) -> Result<Vec<ShareRecord>, ClientError> {
        let request = ShareFetchRequest {
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
        };
        // Only the server's word that a later ask may succeed: a lost
        // connection fails the poll as before.
        self.retrying(
            "fetch",
            |e| e.code().is_some_and(ErrorCode::is_retriable),
            || self.client.share_fetch(request.clone()),
        )
        .await
        .map(|r| r.records)
    }

    /// Calls `ask` until it succeeds, fails with an error `retry` does not
    /// take, or `retry_timeout` is spent; backs off between asks, telling
    /// `on_slot_wait` (and the log) once when it waits for a member slot.
    async fn retrying<T, F: std::future::Future<Output = Result<T, ClientError>>>(
        &self,
        what: &str,
        retry: impl Fn(&ClientError) -> bool,
        ask: impl Fn() -> F,
    ) -> Result<T, ClientError> {
        let started = Instant::now();
        let (mut attempts, mut told) = (0u32, false);
        loop {
            let e = match ask().await {
                Ok(r) => return Ok(r),
                Err(e) => e,
            };
            let left = self.config.retry_timeout.saturating_sub(started.elapsed());
            if !retry(&e) || left.is_zero() {
                return Err(e);
            }
            attempts += 1;
            if !told && e.code() == Some(ErrorCode::TooManyMembers) {
                told = true;
                log::info!(
                    "share group {} on {}: waiting for a share-member slot ({e})",
                    self.group,
                    self.topic
                );
                if let Some(hook) = &self.config.on_slot_wait {
                    (hook.0)(&e);
                }
            } else {
                log::debug!(
                    "share group {}: {what} refused ({e}); asking again",
                    self.group
                );
            }
            let pause = backoff(
                attempts,
                self.config.retry_backoff,
                self.config.retry_backoff_max,
            );
            Timer::after(pause.min(left)).await;
        }
    }

    /// Leaves the share group: the records this worker holds go to other
    /// workers at once, and it no longer counts as an active member (so
    /// the group may be deleted), rather than both lasting until its locks
    /// expire (`lock_ms`). Returns how many records it held; `None` when
    /// the server speaks protocol version 3, which has no leave: nothing is
    /// sent, and the locks lapse as before. Call it once no poll is in
    /// flight: a poll answered after it locks records to the worker again.
    pub async fn leave(&self) -> Result<Option<u64>, ClientError> {
        if self.client.protocol_version().await? < SHARE_LEAVE_VERSION {
            return Ok(None);
        }
        self.client
            .share_leave(&self.group, &self.member_id)
            .await
            .map(Some)
    }

    /// Stops the worker: [`leave`](Self::leave)s the share group.
    pub async fn close(self) -> Result<Option<u64>, ClientError> {
        self.leave().await
    }

    /// Acknowledges records (partition, offset, outcome); one code per
    /// record, `share_lock_lost` for one whose lock had lapsed. A retriable
    /// refusal (no member slot free, say) is sent again with backoff for up
    /// to `retry_timeout`, as a poll is. A lost connection or a timeout is
    /// returned: whether the broker applied the acknowledgement is unknown
    /// (an accepted record is then done, a released one delivered again).
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
        let request = ShareAckRequest {
            group: self.group.clone(),
            topic: self.topic.clone(),
            member_id: self.member_id.clone(),
            acks,
        };
        // Only the server's refusal, which applied nothing, is sent again.
        // After a lost connection or a timeout the first attempt may have
        // been applied: a resend would then answer share_lock_lost, which
        // says "delivered again" of a record that is done, so the caller
        // gets the error (the outcome is unknown).
        self.retrying(
            "acknowledgement",
            |e| e.code().is_some_and(ErrorCode::is_retriable),
            || self.client.share_ack(request.clone()),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::fake_peer::{answer, hello, read_request, take_request};
    use crate::protocol::{ListShareGroupsResponse, ShareFetchResponse};

    /// A worker closing against a version 3 server sends no share_leave
    /// (that server would refuse it): the peer sees the fetch, then the
    /// next request, nothing between.
    #[test]
    fn a_worker_closing_against_a_version_3_server_sends_no_leave() {
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, seen) = std::sync::mpsc::channel();
        let peer = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let (mut buf, mut chunk) = (Vec::new(), vec![0u8; 64 * 1024]);
            loop {
                while let Some(request) = take_request(&mut buf) {
                    let _ = tx.send(request.body.name());
                    let body = match request.body {
                        RequestBody::Hello(_) => match hello("version 3 peer") {
                            ResponseBody::Hello(h) => {
                                ResponseBody::Hello(crate::protocol::HelloResponse {
                                    version: 3,
                                    ..h
                                })
                            }
                            _ => unreachable!(),
                        },
                        RequestBody::ShareFetch(_) => {
                            ResponseBody::ShareFetch(ShareFetchResponse {
                                records: Vec::new(),
                                lock_ms: 30_000,
                            })
                        }
                        RequestBody::ListShareGroups(_) => {
                            ResponseBody::ListShareGroups(ListShareGroupsResponse {
                                groups: Vec::new(),
                            })
                        }
                        other => {
                            crate::protocol::ResponseBody::Error(crate::protocol::ErrorResponse {
                                code: ErrorCode::InvalidRequest,
                                message: format!("{} needs version 4", other.name()),
                            })
                        }
                    };
                    answer(&mut s, request.correlation_id, body);
                }
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        });
        smol::block_on(async {
            let client = Client::connect(&addr).await.unwrap();
            let w = ShareConsumer::new(client.clone(), "g", "t", ShareConfig::default());
            assert!(w.poll().await.unwrap().is_empty());
            assert_eq!(w.close().await.unwrap(), None, "nothing to leave with");
            client.list_share_groups().await.unwrap();
        });
        let names: Vec<&str> = seen.try_iter().collect();
        assert_eq!(names, ["hello", "share_fetch", "list_share_groups"]);
        drop(peer);
    }

    /// A peer of protocol version 4 that answers each share_fetch with the
    /// next of `fetches`, then with no records, and each share_ack with the
    /// next of `acks` (`None`: it closes the connection unanswered, then
    /// takes the next one); it sends the name of each request it reads to
    /// the receiver.
    fn scripted_peer(
        fetches: Vec<ResponseBody>,
        acks: Vec<Option<ResponseBody>>,
    ) -> (String, std::sync::mpsc::Receiver<&'static str>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, seen) = std::sync::mpsc::channel();
        let connections = 1 + acks.iter().filter(|a| a.is_none()).count();
        std::thread::spawn(move || {
            let mut fetches = fetches.into_iter();
            let mut acks = acks.into_iter();
            'connections: for _ in 0..connections {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = Vec::new();
                while let Some(request) = read_request(&mut s, &mut buf) {
                    let _ = tx.send(request.body.name());
                    let body = match request.body {
                        RequestBody::Hello(_) => hello("scripted peer"),
                        RequestBody::ShareFetch(_) => fetches.next().unwrap_or_else(|| {
                            ResponseBody::ShareFetch(ShareFetchResponse {
                                records: Vec::new(),
                                lock_ms: 30_000,
                            })
                        }),
                        RequestBody::ShareAck(_) => match acks.next() {
                            Some(Some(body)) => body,
                            Some(None) => continue 'connections,
                            None => panic!("no answer scripted for this share_ack"),
                        },
                        other => panic!("unexpected {}", other.name()),
                    };
                    answer(&mut s, request.correlation_id, body);
                }
            }
        });
        (addr, seen)
    }

    fn refusal(code: ErrorCode) -> ResponseBody {
        ResponseBody::Error(crate::protocol::ErrorResponse {
            code,
            message: format!("refused: {code}"),
        })
    }

    /// A config that retries within `retry_timeout` at once (1 ms
    /// backoffs), counting the slot-wait notices in `told`.
    fn retrying(
        retry_timeout: Duration,
        told: &Arc<std::sync::atomic::AtomicUsize>,
    ) -> ShareConfig {
        let told = told.clone();
        ShareConfig {
            retry_timeout,
            retry_backoff: Duration::from_millis(1),
            retry_backoff_max: Duration::from_millis(2),
            on_slot_wait: Some(SlotWaitHook(Arc::new(move |e| {
                assert_eq!(e.code(), Some(ErrorCode::TooManyMembers));
                told.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }))),
            ..ShareConfig::default()
        }
    }

    /// A poll refused for want of a member slot asks again, says once that
    /// it waits, and returns the records it then gets.
    #[test]
    fn a_poll_waits_out_too_many_members_and_says_so_once() {
        let record = ShareRecord {
            partition: 0,
            offset: 7,
            timestamp_ms: 0,
            key: None,
            value: None,
            headers: Vec::new(),
            delivery_count: 1,
        };
        let (addr, seen) = scripted_peer(
            vec![
                refusal(ErrorCode::TooManyMembers),
                refusal(ErrorCode::TooManyMembers),
                refusal(ErrorCode::TooManyMembers),
                ResponseBody::ShareFetch(ShareFetchResponse {
                    records: vec![record.clone()],
                    lock_ms: 30_000,
                }),
            ],
            Vec::new(),
        );
        let told = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let got = smol::block_on(async {
            let client = Client::connect(&addr).await.unwrap();
            let w = ShareConsumer::new(client, "g", "t", retrying(Duration::MAX, &told));
            w.poll().await
        });
        assert_eq!(got.unwrap(), [record]);
        assert_eq!(told.load(std::sync::atomic::Ordering::Relaxed), 1);
        let names: Vec<&str> = seen.try_iter().collect();
        assert_eq!(
            names,
            [
                "hello",
                "share_fetch",
                "share_fetch",
                "share_fetch",
                "share_fetch"
            ]
        );
    }

    /// A refusal that is not retriable is returned at the first ask, even
    /// with no bound on the wait; a retriable one with a zero bound too.
    #[test]
    fn a_poll_returns_a_refusal_not_retriable_or_past_its_bound_at_once() {
        for (code, retry_timeout) in [
            (ErrorCode::TooManySharePartitions, Duration::MAX),
            (ErrorCode::InvalidRequest, Duration::MAX),
            (ErrorCode::TooManyMembers, Duration::ZERO),
        ] {
            let (addr, seen) = scripted_peer(vec![refusal(code), refusal(code)], Vec::new());
            let told = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let got = smol::block_on(async {
                let client = Client::connect(&addr).await.unwrap();
                let w = ShareConsumer::new(client, "g", "t", retrying(retry_timeout, &told));
                w.poll().await
            });
            assert_eq!(got.unwrap_err().code(), Some(code));
            assert_eq!(told.load(std::sync::atomic::Ordering::Relaxed), 0, "{code}");
            let names: Vec<&str> = seen.try_iter().collect();
            assert_eq!(names, ["hello", "share_fetch"], "{code}");
        }
    }

    fn acked(results: Vec<ErrorCode>) -> ResponseBody {
        ResponseBody::ShareAck(crate::protocol::ShareAckResponse { results })
    }

    /// Acknowledges one record against a peer answering its share_acks
    /// with `acks` (as [`scripted_peer`]): what the ack returned, how many
    /// slot-wait notices it gave, and the requests the peer read.
    fn ack_against(
        acks: Vec<Option<ResponseBody>>,
        retry_timeout: Duration,
    ) -> (
        Result<Vec<ErrorCode>, ClientError>,
        usize,
        Vec<&'static str>,
    ) {
        let (addr, seen) = scripted_peer(Vec::new(), acks);
        let told = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let got = smol::block_on(async {
            let client = Client::connect(&addr).await.unwrap();
            let w = ShareConsumer::new(client, "g", "t", retrying(retry_timeout, &told));
            w.ack(&[(0, 7, Outcome::Accept)]).await
        });
        let told = told.load(std::sync::atomic::Ordering::Relaxed);
        (got, told, seen.try_iter().collect())
    }

    /// An acknowledgement refused for want of a member slot is sent again
    /// and says once that it waits; one whose connection is lost before
    /// the answer is sent again on a new connection (a record the first
    /// one had settled answers share_lock_lost, so that is harmless). Each
    /// returns the codes it then gets.
    #[test]
    fn an_ack_is_sent_again_past_too_many_members_but_not_past_a_lost_connection() {
        let busy = || Some(refusal(ErrorCode::TooManyMembers));
        let cases = [(
            vec![busy(), busy(), Some(acked(vec![ErrorCode::None]))],
            ErrorCode::None,
            1,
            &["hello", "share_ack", "share_ack", "share_ack"],
        )];
        for (acks, code, waits, requests) in cases {
            let (got, told, names) = ack_against(acks, Duration::MAX);
            assert_eq!(got.unwrap(), [code]);
            assert_eq!(told, waits, "{code}");
            assert_eq!(names, requests, "{code}");
        }
        // A lost connection is not sent again: the broker may have applied
        // it, and a resend's share_lock_lost would say the accepted record
        // comes back. The caller hears the outcome is unknown.
        let (got, told, names) = ack_against(
            vec![None, Some(acked(vec![ErrorCode::ShareLockLost]))],
            Duration::MAX,
        );
        assert!(got.is_err(), "{got:?}");
        assert_eq!(told, 0);
        assert_eq!(names, ["hello", "share_ack"]);
    }

    /// An acknowledgement refused with a code that is not retriable is
    /// returned at the first ask, even with no bound on the wait; a
    /// retriable one with a zero bound too.
    #[test]
    fn an_ack_returns_a_refusal_not_retriable_or_past_its_bound_at_once() {
        for (code, retry_timeout) in [
            (ErrorCode::InvalidRequest, Duration::MAX),
            (ErrorCode::TooManyMembers, Duration::ZERO),
        ] {
            let (got, told, names) = ack_against(
                vec![Some(refusal(code)), Some(refusal(code))],
                retry_timeout,
            );
            assert_eq!(got.unwrap_err().code(), Some(code));
            assert_eq!(told, 0, "{code}");
            assert_eq!(names, ["hello", "share_ack"], "{code}");
        }
    }
}
