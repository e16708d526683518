//! The threads a topic create's syncs run on, off the storage thread
//! (`Engine::create_sync`): at most [`SYNC_THREADS`], whatever the number
//! of partitions being made.
//!
//! A thread per partition started 64 threads for a 64-partition create,
//! each with its stack, on a board of 512 MiB whose cores start a thread
//! slowly. The threads here are started as work comes in while none is
//! idle, and live until the storage thread ends: an idle one waits on a
//! condition variable and never wakes. Work runs in the order handed
//! over; each piece rings the storage thread's doorbell when done.

use super::doorbell::Doorbell;
use std::collections::VecDeque;
use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// At most this many threads: a create's syncs go on while another's wait
/// on the device, and its flushes share the file system's journal commits.
pub(super) const SYNC_THREADS: usize = 2;
/// Fdatasyncs, fsyncs and one small metadata file.
const STACK_BYTES: usize = 256 * 1024;
/// As `/proc/PID/task/*/comm` shows it.
pub(super) const THREAD_NAME: &str = "skiff-create";
const _: () = assert!(THREAD_NAME.len() <= 15, "Linux keeps 15 bytes of a name");

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// Threads waiting for a job.
    idle: usize,
    /// The storage thread is ending: the threads run what is queued, then
    /// end.
    closing: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    work: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(super) struct SyncPool {
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
    bell: Arc<Doorbell>,
}

/// Work handed to the pool: its outcome once done (`None` if it panicked).
pub(super) struct Pending<T>(Arc<Outcome<T>>);

struct Outcome<T> {
    done: AtomicBool,
    out: Mutex<Option<Option<T>>>,
}

impl<T> Pending<T> {
    pub(super) fn is_done(&self) -> bool {
        self.0.done.load(Ordering::Acquire)
    }

    /// The outcome, once [`Pending::is_done`] (or the pool is closed).
    pub(super) fn take(self) -> Option<T> {
        let mut out = self.0.out.lock().unwrap_or_else(|e| e.into_inner());
        out.take().flatten()
    }
}

impl SyncPool {
    pub(super) fn new(bell: &Arc<Doorbell>) -> SyncPool {
        SyncPool {
            shared: Arc::default(),
            threads: Vec::new(),
            bell: bell.clone(),
        }
    }

    /// Runs `work` on a pool thread, starting one if none is idle and
    /// fewer than [`SYNC_THREADS`] run. If no thread can be started and
    /// none runs, `work` runs here: slower, never lost.
    pub(super) fn run<T: Send + 'static>(
        &mut self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Pending<T> {
        let slot = Arc::new(Outcome {
            done: AtomicBool::new(false),
            out: Mutex::new(None),
        });
        let job: Job = Box::new({
            let (slot, bell) = (slot.clone(), self.bell.clone());
            move || {
                // Caught so that the thread goes on with the next job.
                let out = std::panic::catch_unwind(AssertUnwindSafe(work)).ok();
                *slot.out.lock().unwrap_or_else(|e| e.into_inner()) = Some(out);
                slot.done.store(true, Ordering::Release);
                bell.ring();
            }
        });
        let mut q = self.shared.lock();
        if q.idle == 0 && self.threads.len() < SYNC_THREADS {
            match self.spawn() {
                Ok(t) => self.threads.push(t),
                Err(e) if self.threads.is_empty() => {
                    drop(q);
                    log::warn!(
                        "cannot start {THREAD_NAME} ({e}): a create syncs on the storage thread"
                    );
                    job();
                    return Pending(slot);
                }
                // The running ones take it.
                Err(_) => {}
            }
        }
        q.jobs.push_back(job);
        drop(q);
        self.shared.work.notify_one();
        Pending(slot)
    }

    fn spawn(&self) -> io::Result<std::thread::JoinHandle<()>> {
        let shared = self.shared.clone();
        std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .stack_size(STACK_BYTES)
            .spawn(move || serve(&shared))
    }

    /// Waits for everything handed over to be done, and the threads to end.
    pub(super) fn close(&mut self) {
        self.shared.lock().closing = true;
        self.shared.work.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for SyncPool {
    /// A storage thread that unwinds without its shutdown: the threads end
    /// once the queue is run, not joined.
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.work.notify_all();
    }
}

fn serve(shared: &Shared) {
    loop {
        let mut q = shared.lock();
        let job = loop {
            if let Some(job) = q.jobs.pop_front() {
                break job;
            }
            if q.closing {
                return;
            }
            q.idle += 1;
            q = shared.work.wait(q).unwrap_or_else(|e| e.into_inner());
            q.idle -= 1;
        };
        drop(q);
        job();
    }
}
