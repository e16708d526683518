//! The one thread that runs the async side's blocking jobs: the producer
//! registry's writes and the producer snapshots (each fsyncs), and a
//! cancelled produce's wait for its ack (`broker::produce`).
//!
//! `smol::unblock` ran them on the `blocking` crate's pool before, whose
//! last thread never ends and looks for work every 500 ms: two wake-ups a
//! second for the rest of the life of a broker that had written its
//! registry once (docs/performance.md, "An idle broker"). This thread
//! sleeps in `recv` until a job comes. It is started by the first job,
//! runs the jobs one at a time in the order they were handed over, and
//! lives as long as the process. One is enough: registry writes are
//! serialised by the registry's lock anyway, snapshots by their own, and
//! a cancelled produce waits one group commit at most.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::OnceLock;

/// The thread's name, as `/proc/PID/task/*/comm` shows it.
pub const THREAD_NAME: &str = "skiff-offload";
const _: () = assert!(THREAD_NAME.len() <= 15, "Linux keeps 15 bytes of a name");

type Job = Box<dyn FnOnce() + Send>;

/// The thread's queue; `None` if it could not be started.
static QUEUE: OnceLock<Option<async_channel::Sender<Job>>> = OnceLock::new();

fn submit(job: Job) {
    let queue = QUEUE.get_or_init(|| {
        // async-channel's, already in the binary for the network side:
        // std's mpsc cost 7 KiB more.
        let (tx, rx) = async_channel::unbounded::<Job>();
        let started = std::thread::Builder::new()
            .name(THREAD_NAME.to_owned())
            .spawn(move || {
                while let Ok(job) = rx.recv_blocking() {
                    job();
                }
            });
        match started {
            Ok(_) => Some(tx),
            Err(e) => {
                log::warn!("cannot start {THREAD_NAME} ({e}): its jobs run where handed over");
                None
            }
        }
    });
    // The receiver lives as long as the process, so a send cannot fail
    // while the thread runs; a job it gives back runs here instead.
    let unsent = match queue {
        Some(tx) => tx.try_send(job).err().map(|e| e.into_inner()),
        None => Some(job),
    };
    if let Some(job) = unsent {
        job();
    }
}

/// Runs `f` on the thread and resolves to what it returns; a panic in
/// `f` is resumed in the awaiting task, as `smol::unblock` did. `f` is
/// queued now, not at the first poll, and runs even if the future is
/// dropped first.
pub fn run<T, F>(f: F) -> impl Future<Output = T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    submit(Box::new(move || {
        // Caught so the thread survives to run the next job.
        let r = std::panic::catch_unwind(AssertUnwindSafe(f));
        // Nobody left to tell if the future was dropped.
        let _ = tx.send(r);
    }));
    async move {
        match rx.await.expect("a job sends its result before it ends") {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// Runs `f` on the thread with nobody awaiting it. A panic in `f` is
/// dropped with it (in a release build, which aborts on panic, the
/// process ends).
pub fn detach<F>(f: F)
where
    F: FnOnce() + Send + 'static,
{
    submit(Box::new(move || {
        let _ = std::panic::catch_unwind(AssertUnwindSafe(f));
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn jobs_run_in_order_on_the_named_thread() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut results = Vec::new();
        for i in 0..20 {
            let seen = seen.clone();
            if i % 2 == 0 {
                detach(move || seen.lock().unwrap().push(i));
            } else {
                results.push(run(move || {
                    seen.lock().unwrap().push(i);
                    std::thread::current().name().map(str::to_owned)
                }));
            }
        }
        for r in results {
            assert_eq!(smol::block_on(r).as_deref(), Some(THREAD_NAME));
        }
        // The last job was a `run`: every job before it is done too.
        assert_eq!(*seen.lock().unwrap(), (0..20).collect::<Vec<_>>());
    }

    #[test]
    fn a_panic_reaches_the_awaiting_task_and_the_thread_goes_on() {
        let panicked =
            std::panic::catch_unwind(|| smol::block_on(run(|| -> u32 { panic!("job panicked") })));
        let message = panicked.expect_err("the panic is resumed");
        assert_eq!(message.downcast_ref::<&str>(), Some(&"job panicked"));
        detach(|| panic!("a detached job panicked"));
        assert_eq!(smol::block_on(run(|| 7)), 7);
    }
}
