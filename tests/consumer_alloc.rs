//! A consumer sizes each fetch by the frame its connection's hello answer
//! gave, and reads it in place: a poll makes no copy of that answer. The
//! copy's tell is the server's version string, an allocation of exactly
//! its length at alignment 1 on the polling thread; this file holds one
//! test so that nothing else allocates meanwhile.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::Broker;
use skiff::client::{Client, Consumer, ConsumerConfig, StartFrom};
use skiff::protocol::CreateTopicRequest;

/// The server's version string, as its hello answer carries it.
const SERVER_VERSION: &str = env!("CARGO_PKG_VERSION");

thread_local! {
    /// Counting on this thread (the one polling) only.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

/// Allocations the size of the version string, at alignment 1.
static VERSION_SIZED: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: every call is passed on to the system allocator as it is; the
// counter beside it neither allocates nor touches the memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() == 1
            && layout.size() == SERVER_VERSION.len()
            && COUNTING.try_with(Cell::get).unwrap_or(false)
        {
            VERSION_SIZED.fetch_add(1, Ordering::Relaxed);
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
        let client = Client::connect(&server.unix_addr()).await.unwrap();
        // A name no other length-alike: its copies are not counted.
        let topic = "a-topic-named-apart";
        assert_ne!(topic.len(), SERVER_VERSION.len());
        client
            .create_topic(CreateTopicRequest {
                name: topic.into(),
                partitions: Some(1),
                segment_bytes: Some(1024 * 1024),
                segments: Some(2),
                ..Default::default()
            })
            .await
            .unwrap();
        let config = ConsumerConfig {
            max_wait: Duration::from_millis(1),
            ..ConsumerConfig::default()
        };
        let mut consumer = Consumer::new(client.clone(), config);
        consumer
            .assign(topic, None, StartFrom::Earliest)
            .await
            .unwrap();
        // The first poll connects things up; the rest are the steady state.
        assert!(consumer.poll_batch().await.unwrap().is_empty());
        COUNTING.with(|c| c.set(true));
        for _ in 0..POLLS {
            assert!(consumer.poll_batch().await.unwrap().is_empty());
        }
        COUNTING.with(|c| c.set(false));
    });
    let copies = VERSION_SIZED.load(Ordering::Relaxed);
    assert_eq!(
        copies, 0,
        "{copies} version-sized allocations in {POLLS} polls"
    );
}
