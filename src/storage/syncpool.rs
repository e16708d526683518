//! The threads the storage thread hands its syncs to, so that it goes on
//! serving appends and fetches meanwhile: a pool per kind of work, each of
//! at most a few threads whatever the number of partitions (a topic
//! create's syncs, `Engine::create_sync`: [`CREATE`]; the checkpoint
//! refresh, `Engine::housekeeping`: [`CHECKPOINTS`]).
//!
//! A thread per partition started 64 threads for a 64-partition create,
//! and a thread per refresh plus one per checkpoint (65 for 64
//! partitions, once a second while data flows), each with its stack, on a
//! board of 512 MiB whose cores start a thread slowly. The threads here
//! are started as work comes in while none is idle. An idle one waits on
//! a condition variable, and ends once it has waited [`IDLE_EXIT`] for
//! work (kept for good, an idle broker that had refreshed many
//! checkpoints kept 16 threads asleep): it wakes for that once, not
//! periodically, and the next work starts a thread again. Work runs in
//! the order handed over; each piece rings the storage thread's doorbell
//! when done.

use super::doorbell::Doorbell;
use std::collections::VecDeque;
use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How long a pool thread waits for work before it ends: longer than the
/// checkpoint refresh's second, so that a steady load keeps its threads.
pub(super) const IDLE_EXIT: Duration = Duration::from_secs(10);

/// A pool's threads: how many at most, their name and stack.
#[derive(Debug, Clone, Copy)]
pub(super) struct Spec {
    /// As `/proc/PID/task/*/comm` shows it.
    pub(super) name: &'static str,
    pub(super) threads: usize,
    stack_bytes: usize,
    /// An idle thread ends after this.
    idle_exit: Duration,
}

/// A create's syncs: fdatasyncs, fsyncs and one small metadata file. Two
/// threads: a create's syncs go on while another's wait on the device,
/// and its flushes share the file system's journal commits.
pub(super) const CREATE: Spec = Spec {
    name: "skiff-create",
    threads: 2,
    stack_bytes: 256 * 1024,
    idle_exit: IDLE_EXIT,
};

/// Checkpoint rewrites (an open, a write, an fdatasync each), up to 16 at
/// once: their fdatasyncs are then in flight together, and the block
/// layer serves flushes asked for while one runs with one flush after it.
/// One after another, each partition's rewrite cost the device a flush of
/// its own, which on an SD card doubled the flushes of a light load over
/// many partitions (docs/performance.md, "many partitions on one card").
pub(super) const CHECKPOINTS: Spec = Spec {
    name: "skiff-checkpt",
    threads: 16,
    stack_bytes: 64 * 1024,
    idle_exit: IDLE_EXIT,
};

const _: () = assert!(CREATE.name.len() <= 15 && CHECKPOINTS.name.len() <= 15);

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// Threads waiting for a job.
    idle: usize,
    /// Threads started and not yet ended (an idle one ends).
    running: usize,
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
    /// Those started; some may have ended idle (joined at the next start).
    threads: Vec<std::thread::JoinHandle<()>>,
    bell: Arc<Doorbell>,
    spec: Spec,
    /// Tests: no thread can be started (EAGAIN).
    #[cfg(test)]
    pub(super) spawn_fails: Arc<std::sync::atomic::AtomicBool>,
}

/// Work handed to the pool: its outcome once done (`None` if it panicked).
pub(super) struct Pending<T>(Arc<Outcome<T>>);

struct Outcome<T> {
    done: AtomicBool,
    out: Mutex<Option<Option<T>>>,
    finished: Condvar,
}

impl<T> Pending<T> {
    pub(super) fn is_done(&self) -> bool {
        self.0.done.load(Ordering::Acquire)
    }

    /// Waits until the work is done.
    pub(super) fn wait(&self) {
        let mut out = self.0.out.lock().unwrap_or_else(|e| e.into_inner());
        while !self.is_done() {
            out = self.0.finished.wait(out).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The outcome, once [`Pending::is_done`] (or the pool is closed).
    pub(super) fn take(self) -> Option<T> {
        let mut out = self.0.out.lock().unwrap_or_else(|e| e.into_inner());
        out.take().flatten()
    }
}

impl SyncPool {
    pub(super) fn new(bell: &Arc<Doorbell>, spec: Spec) -> SyncPool {
        SyncPool {
            shared: Arc::default(),
            threads: Vec::new(),
            bell: bell.clone(),
            spec,
            #[cfg(test)]
            spawn_fails: Arc::default(),
        }
    }

    /// Runs `work` on a pool thread, starting one if none is idle and
    /// fewer than the spec's threads run. If no thread can be started and
    /// none runs, `work` runs here: slower, never lost.
    pub(super) fn run<T: Send + 'static>(
        &mut self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Pending<T> {
        let (job, pending) = self.job(work);
        if let Err((e, job)) = self.hand_over(job) {
            log::warn!(
                "cannot start {} ({e}): its work runs on the storage thread",
                self.spec.name
            );
            job();
        }
        pending
    }

    /// As [`SyncPool::run`], but work no thread can take is refused, not
    /// run here: what is tried again later anyway (a checkpoint) is not
    /// worth holding every append for its flush.
    pub(super) fn try_run<T: Send + 'static>(
        &mut self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<Pending<T>> {
        let (job, pending) = self.job(work);
        self.hand_over(job).map_err(|(e, _)| e)?;
        Ok(pending)
    }

    fn job<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> (Job, Pending<T>) {
        let slot = Arc::new(Outcome {
            done: AtomicBool::new(false),
            out: Mutex::new(None),
            finished: Condvar::new(),
        });
        let job: Job = Box::new({
            let (slot, bell) = (slot.clone(), self.bell.clone());
            move || {
                // Caught so that the thread goes on with the next job.
                let out = std::panic::catch_unwind(AssertUnwindSafe(work)).ok();
                let mut held = slot.out.lock().unwrap_or_else(|e| e.into_inner());
                *held = Some(out);
                slot.done.store(true, Ordering::Release);
                drop(held);
                slot.finished.notify_all();
                bell.ring();
            }
        });
        (job, Pending(slot))
    }

    /// Queues `job` for the pool's threads, starting one if none is idle
    /// and there is room; handed back if no thread runs nor can start.
    fn hand_over(&mut self, job: Job) -> Result<(), (io::Error, Job)> {
        let mut q = self.shared.lock();
        if q.idle == 0 && q.running < self.spec.threads {
            // Those that ended idle: joined (at once), so that none is
            // left for the kernel to reap.
            let (ended, live) = std::mem::take(&mut self.threads)
                .into_iter()
                .partition::<Vec<_>, _>(|t| t.is_finished());
            self.threads = live;
            for t in ended {
                let _ = t.join();
            }
            match self.spawn() {
                Ok(t) => {
                    self.threads.push(t);
                    q.running += 1;
                }
                Err(e) if q.running == 0 => return Err((e, job)),
                // The running ones take it.
                Err(_) => {}
            }
        }
        q.jobs.push_back(job);
        drop(q);
        self.shared.work.notify_one();
        Ok(())
    }

    fn spawn(&self) -> io::Result<std::thread::JoinHandle<()>> {
        #[cfg(test)]
        if self.spawn_fails.load(Ordering::Relaxed) {
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        }
        let (shared, idle_exit) = (self.shared.clone(), self.spec.idle_exit);
        std::thread::Builder::new()
            .name(self.spec.name.into())
            .stack_size(self.spec.stack_bytes)
            .spawn(move || serve(&shared, idle_exit))
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

fn serve(shared: &Shared, idle_exit: Duration) {
    loop {
        let mut q = shared.lock();
        let job = loop {
            if let Some(job) = q.jobs.pop_front() {
                break job;
            }
            if q.closing {
                q.running -= 1;
                return;
            }
            q.idle += 1;
            let (held, waited) = shared
                .work
                .wait_timeout(q, idle_exit)
                .unwrap_or_else(|e| e.into_inner());
            q = held;
            q.idle -= 1;
            // Ended under the lock, with the queue empty: work handed over
            // while this thread counted as idle is in the queue, and this
            // thread takes it before it may end.
            if waited.timed_out() && q.jobs.is_empty() && !q.closing {
                q.running -= 1;
                return;
            }
        };
        drop(q);
        job();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    const NAME: &str = "skiff-pooltest";

    /// This process's threads named [`NAME`] (nextest runs each test in a
    /// process of its own).
    fn threads() -> usize {
        std::fs::read_dir("/proc/self/task")
            .expect("/proc/self/task")
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|comm| comm.trim_end() == NAME)
            .count()
    }

    /// Waits, up to a bound no busy machine reaches, for `want` threads.
    fn threads_become(want: usize, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while threads() != want {
            assert!(Instant::now() < deadline, "{what}: {} threads", threads());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Threads that have been idle a while end (an idle broker kept 16
    /// checkpoint threads asleep for good), and work that comes after is
    /// run all the same, on a thread started for it.
    #[test]
    fn idle_threads_end_and_work_after_starts_one() {
        let bell = Arc::new(Doorbell::new().expect("doorbell"));
        let spec = Spec {
            name: NAME,
            threads: 4,
            stack_bytes: 64 * 1024,
            idle_exit: Duration::from_millis(50),
        };
        let mut pool = SyncPool::new(&bell, spec);
        // Four jobs held at once: four threads.
        let gate = Arc::new(std::sync::Barrier::new(5));
        let held: Vec<_> = (0..4)
            .map(|i| {
                let gate = gate.clone();
                pool.run(move || {
                    gate.wait();
                    i
                })
            })
            .collect();
        threads_become(4, "four held");
        gate.wait();
        for (i, p) in held.into_iter().enumerate() {
            p.wait();
            assert_eq!(p.take(), Some(i));
        }
        threads_become(0, "idle");
        for round in 0..3 {
            let p = pool.run(move || round);
            p.wait();
            assert_eq!(p.take(), Some(round));
        }
        pool.close();
        threads_become(0, "after close");
    }
}
