//! A consumer sizes each fetch by the frame its connection's hello answer
//! gave, and a share consumer checks the protocol version it gave, both
//! read in place: a poll makes no copy of that answer. The copy's tell is
//! the server's version string, an allocation of exactly its length at
//! alignment 1 on the polling thread, counted per thread so that tests
//! running beside it are not counted.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

use common::Broker;
use skiff::client::{Client, Consumer, ConsumerConfig, ShareConfig, ShareConsumer, StartFrom};
use skiff::protocol::CreateTopicRequest;

/// The server's version string, as its hello answer carries it.
const SERVER_VERSION: &str = env!("CARGO_PKG_VERSION");

thread_local! {
    /// Counting on this thread (the one polling) only.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    /// This thread's allocations the size of the version string, at
    /// alignment 1, while counting.
    static VERSION_SIZED: Cell<usize> = const { Cell::new(0) };
}

struct Counting;

// SAFETY: every call is passed on to the system allocator as it is; the
// counter beside it neither allocates nor touches the memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() == 1
            && layout.size() == SERVER_VERSION.len()
            && COUNTING.try_with(Cell::get).unwrap_or(false)
        {
            let _ = VERSION_SIZED.try_with(|n| n.set(n.get() + 1));
        }
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn a_poll_makes_no_copy_of_the_hello_answer() {
    const POLLS: usize = 20;
    let server = Broker::start("");
    smol::block_on(async {
        let client = connect_with_topic(&server).await;
        let config = ConsumerConfig {
            max_wait: Duration::from_millis(1),
            ..ConsumerConfig::default()
        };
        let mut consumer = Consumer::new(client.clone(), config);
        consumer
            .assign(TOPIC, None, StartFrom::Earliest)
            .await
            .unwrap();
        // The first poll connects things up; the rest are the steady state.
        assert!(consumer.poll_batch().await.unwrap().is_empty());
        let copies = counted(|| async {
            for _ in 0..POLLS {
                assert!(consumer.poll_batch().await.unwrap().is_empty());
            }
        })
        .await;
        assert_eq!(
            copies, 0,
            "{copies} version-sized allocations in {POLLS} polls"
        );
    });
}

/// A name no other length-alike: its copies are not counted.
const TOPIC: &str = "a-topic-named-apart";

/// A client of `server`, which holds [`TOPIC`], empty.
async fn connect_with_topic(server: &Broker) -> Client {
    assert_ne!(TOPIC.len(), SERVER_VERSION.len());
    let client = Client::connect(&server.unix_addr()).await.unwrap();
    client
        .create_topic(CreateTopicRequest {
            name: TOPIC.into(),
            partitions: Some(1),
            segment_bytes: Some(1024 * 1024),
            segments: Some(2),
            ..Default::default()
        })
        .await
        .unwrap();
    client
}

/// The version-sized allocations `f` makes on this thread.
async fn counted<F: std::future::Future<Output = ()>>(f: impl FnOnce() -> F) -> usize {
    let before = VERSION_SIZED.with(Cell::get);
    COUNTING.with(|c| c.set(true));
    f().await;
    COUNTING.with(|c| c.set(false));
    VERSION_SIZED.with(Cell::get) - before
}

#[test]
fn a_share_consumer_poll_makes_no_copy_of_the_hello_answer() {
    const POLLS: usize = 20;
    let server = Broker::start("");
    smol::block_on(async {
        let client = connect_with_topic(&server).await;
        let group = "a-group-named-apart";
        assert_ne!(group.len(), SERVER_VERSION.len());
        let config = ShareConfig {
            max_records: 10,
            max_wait: Duration::from_millis(1),
            from_earliest: true,
            ..Default::default()
        };
        let worker = ShareConsumer::new(client, group, TOPIC, config);
        assert!(worker.poll().await.unwrap().is_empty());
        let copies = counted(|| async {
            for _ in 0..POLLS {
                assert!(worker.poll().await.unwrap().is_empty());
            }
        })
        .await;
        assert_eq!(
            copies, 0,
            "{copies} version-sized allocations in {POLLS} share polls"
        );
    });
}
