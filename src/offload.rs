//! The one thread that runs the async side's blocking jobs (the producer
//! registry's writes, the producer snapshots and the broker's topic and
//! settings files, each fsyncs) and awaits
//! a cancelled produce's ack (`broker::produce`) to settle it.
//!
//! `smol::unblock` ran them on the `blocking` crate's pool before, whose
//! last thread never ends and looks for work every 500 ms: two wake-ups a
//! second for the rest of the life of a broker that had written its
//! registry once (docs/performance.md, "An idle broker"). This thread
//! sleeps until a job comes or a wait's ack arrives. It is started by the
//! first job and lives as long as the process. Blocking jobs run one at a
//! time in the order they were handed over; one thread is enough for
//! them: registry writes are serialised by the registry's lock anyway,
//! snapshots by their own, the broker's files by its admin lock.
//!
//! A wait is not a blocking job: it is a task on a `LocalExecutor` the
//! thread drives, polled between blocking jobs, so a registry write or a
//! snapshot never queues behind another produce's ack (a group commit, or
//! as long as a stalled device holds it). A blocking job does hold the
//! waits back while it runs, which is fine: a wait only has to settle
//! eventually. The executor is smol's, already in the binary for the
//! network side, and adds no thread and no timer; a separate waiter thread
//! would cost a thread, and settling on the storage thread would put the
//! producer table's lock on the write path.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::OnceLock;

use futures_lite::FutureExt;

/// The thread's name, as `/proc/PID/task/*/comm` shows it.
pub const THREAD_NAME: &str = "skiff-offload";
const _: () = assert!(THREAD_NAME.len() <= 15, "Linux keeps 15 bytes of a name");

enum Job {
    /// Runs on the thread, holding it until it returns.
    Blocking(Box<dyn FnOnce() + Send>),
    /// Polled on the thread until it completes, between blocking jobs.
    Wait(Pin<Box<dyn Future<Output = ()> + Send>>),
}

/// The thread's queue; `None` if it could not be started.
static QUEUE: OnceLock<Option<async_channel::Sender<Job>>> = OnceLock::new();

/// The thread's body: receives the jobs in order, runs the blocking ones
/// and spawns the waits, and polls the waits whenever it is not running a
/// blocking job.
fn serve(rx: async_channel::Receiver<Job>) {
    let ex = smol::LocalExecutor::new();
    futures_lite::future::block_on(ex.run(async {
        while let Ok(job) = rx.recv().await {
            match job {
                Job::Blocking(f) => {
                    f();
                    // Lets the waits whose acks came in meanwhile settle
                    // before the next job of a long queue.
                    futures_lite::future::yield_now().await;
                }
                Job::Wait(w) => ex.spawn(w).detach(),
            }
        }
    }));
}

fn submit(job: Job) {
    let queue = QUEUE.get_or_init(|| {
        // async-channel's, already in the binary for the network side:
        // std's mpsc cost 7 KiB more.
        let (tx, rx) = async_channel::unbounded::<Job>();
        let started = std::thread::Builder::new()
            .name(THREAD_NAME.to_owned())
            .spawn(move || serve(rx));
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
    match unsent {
        None => {}
        Some(Job::Blocking(f)) => f(),
        Some(Job::Wait(w)) => futures_lite::future::block_on(w),
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
    submit(Job::Blocking(Box::new(move || {
        // Caught so the thread survives to run the next job.
        let r = std::panic::catch_unwind(AssertUnwindSafe(f));
        // Nobody left to tell if the future was dropped.
        let _ = tx.send(r);
    })));
    async move {
        match rx.await.expect("a job sends its result before it ends") {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// Polls `f` on the thread until it completes, with nobody awaiting it,
/// without holding up the blocking jobs: for a wait that must end in
/// something done (a cancelled produce's settle). A panic in `f` is
/// dropped with it (in a release build, which aborts on panic, the
/// process ends).
pub fn spawn<F>(f: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    submit(Job::Wait(Box::pin(async move {
        let _ = AssertUnwindSafe(f).catch_unwind().await;
    })));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// Long enough never to be reached by a job that is not held up.
    const PATIENCE: Duration = Duration::from_secs(10);

    fn thread_name() -> Option<String> {
        std::thread::current().name().map(str::to_owned)
    }

    #[test]
    fn jobs_run_in_order_on_the_named_thread() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let results: Vec<_> = (0..20)
            .map(|i| {
                let seen = seen.clone();
                run(move || {
                    seen.lock().unwrap().push(i);
                    thread_name()
                })
            })
            .collect();
        for r in results {
            assert_eq!(smol::block_on(r).as_deref(), Some(THREAD_NAME));
        }
        assert_eq!(*seen.lock().unwrap(), (0..20).collect::<Vec<_>>());
    }

    #[test]
    fn a_panic_reaches_the_awaiting_task_and_the_thread_goes_on() {
        let panicked =
            std::panic::catch_unwind(|| smol::block_on(run(|| -> u32 { panic!("job panicked") })));
        let message = panicked.expect_err("the panic is resumed");
        assert_eq!(message.downcast_ref::<&str>(), Some(&"job panicked"));
        spawn(async { panic!("a spawned wait panicked") });
        assert_eq!(smol::block_on(run(|| 7)), 7);
        let (tx, rx) = mpsc::channel();
        spawn(async move { tx.send(thread_name()).unwrap() });
        assert_eq!(
            rx.recv_timeout(PATIENCE).unwrap().as_deref(),
            Some(THREAD_NAME)
        );
    }

    /// A registry write must not queue behind a cancelled produce's ack,
    /// which a stalled device can hold back for as long as it stalls:
    /// here the ack is a oneshot held until the blocking job is done.
    #[test]
    fn a_blocking_job_runs_while_a_wait_is_outstanding() {
        let (ack_tx, ack_rx) = oneshot::channel::<u32>();
        let (settled_tx, settled_rx) = mpsc::channel();
        spawn(async move {
            let ack = ack_rx.await.expect("the ack is sent");
            settled_tx.send((ack, thread_name())).unwrap();
        });
        let (done_tx, done_rx) = mpsc::channel();
        // Not awaited: it runs anyway, and a hung thread shows as a timeout.
        drop(run(move || done_tx.send(thread_name()).unwrap()));
        let ran_on = done_rx
            .recv_timeout(PATIENCE)
            .expect("the blocking job ran while the ack was outstanding");
        assert_eq!(ran_on.as_deref(), Some(THREAD_NAME));
        assert!(settled_rx.try_recv().is_err(), "nothing to settle yet");
        // The ack comes in (from another thread, as storage's does): the
        // wait is woken and settles on the thread.
        std::thread::spawn(move || ack_tx.send(5).unwrap())
            .join()
            .unwrap();
        let (ack, on) = settled_rx.recv_timeout(PATIENCE).expect("the wait settled");
        assert_eq!((ack, on.as_deref()), (5, Some(THREAD_NAME)));
    }
}
