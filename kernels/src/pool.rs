//! The thread pool kernels run on, and the SIMD path they use.
//!
//! A [`CpuPool`] of `threads` runs each parallel kernel on `threads - 1` worker threads plus the
//! calling thread. A forward pass launches about ten kernels per layer, each a few microseconds
//! to a few hundred microseconds long, so the cost that matters is the hand-off between them:
//! workers stay hot between launches — they spin for `SPIN`, then yield the core for up to
//! `YIELD`, and only then sleep on a condition variable — so a launch during a step reaches
//! running workers through one atomic store, not a futex wake.
//!
//! Invariants:
//! - A job's closure lives on the submitting thread's stack. A worker touches it only between
//!   `active += 1` and `active -= 1`, and only after seeing the job open (`closed == false`) with
//!   the epoch it woke for; the submitter closes the job and waits for `active == 0` before it
//!   returns. All of these are `SeqCst`, so either the submitter sees the worker's increment and
//!   waits, or the worker sees the job closed and backs out without reading it.
//! - One job runs at a time (the submit lock); a launch from inside a task runs inline.
//! - A panicking task does not kill a worker: the panic is caught, the remaining tasks still run,
//!   and the submitter panics after the job is closed.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::KernelError;
use crate::isa::Isa;
use crate::matmul::InputRounding;

/// How long an idle worker busy-waits for the next launch.
const SPIN: Duration = Duration::from_micros(100);
/// How long an idle worker then keeps polling between `yield_now` calls before it sleeps.
const YIELD: Duration = Duration::from_millis(2);

thread_local! {
    /// Set while this thread runs a task of some pool (a nested launch then runs inline).
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

/// One launch: `tasks` calls of `f`.
///
/// The tasks are cut into one contiguous share per thread (thread `slot` owns share `slot`); a
/// thread first claims the tasks of its own share in order, then helps with the others'. Kernels
/// number their tasks in memory order, so each thread streams one contiguous stretch of the data
/// (which keeps hardware and software prefetching on data this core will use) while a thread that
/// falls behind still gets help.
struct Job<'f> {
    f: &'f (dyn Fn(usize) + Sync),
    /// Per share: the next unclaimed task and the share's end, each share on its own cache lines
    /// so that a thread claiming its own tasks does not take the line from the others.
    shares: Box<[CachePadded<(AtomicUsize, usize)>]>,
    panicked: AtomicBool,
}

impl<'f> Job<'f> {
    fn new(f: &'f (dyn Fn(usize) + Sync), tasks: usize, threads: usize) -> Self {
        let threads = threads.max(1);
        let shares = (0..threads)
            .map(|s| CachePadded((AtomicUsize::new(tasks * s / threads), tasks * (s + 1) / threads)))
            .collect();
        Job { f, shares, panicked: AtomicBool::new(false) }
    }

    /// Claims and runs tasks, own share first, until none are left.
    fn work(&self, slot: usize) {
        let was = IN_TASK.with(|t| t.replace(true));
        let n = self.shares.len();
        for s in (0..n).map(|k| (slot + k) % n) {
            let (next, end) = &self.shares[s].0;
            loop {
                let i = next.fetch_add(1, SeqCst);
                if i >= *end {
                    break;
                }
                if catch_unwind(AssertUnwindSafe(|| (self.f)(i))).is_err() {
                    self.panicked.store(true, SeqCst);
                }
            }
        }
        IN_TASK.with(|t| t.set(was));
    }
}

/// A value alone on its cache lines: 128 bytes, as the adjacent-line prefetcher of x86 cores pulls
/// lines in pairs.
#[repr(align(128))]
struct CachePadded<T>(T);

/// State shared by the submitter and the workers.
struct Shared {
    /// Bumped once per launch (and once at shutdown).
    epoch: AtomicU64,
    /// The open job (a `*const Job` erased to `()`), valid while `closed` is false.
    job: AtomicPtr<()>,
    closed: AtomicBool,
    /// Workers currently between checking a job in and out.
    active: AtomicUsize,
    stop: AtomicBool,
    /// Workers asleep on `wake` (a launch notifies only when some are).
    sleepers: AtomicUsize,
    sleep_lock: Mutex<()>,
    wake: Condvar,
}

impl Shared {
    /// A worker's life. It starts from epoch 0, the pool's initial epoch, so a launch that
    /// comes before the thread first runs is still seen.
    fn worker_loop(&self, slot: usize) {
        let mut seen = 0;
        loop {
            seen = self.wait_for_epoch(seen);
            if self.stop.load(SeqCst) {
                return;
            }
            self.active.fetch_add(1, SeqCst);
            if !self.closed.load(SeqCst) && self.epoch.load(SeqCst) == seen {
                // SAFETY: the job is open and we are counted in `active`, so the submitter is
                // still waiting and the `Job` on its stack is alive (module invariant).
                let job = unsafe { &*self.job.load(SeqCst).cast::<Job<'_>>() };
                job.work(slot);
            }
            self.active.fetch_sub(1, SeqCst);
        }
    }

    /// Waits until the epoch differs from `seen` (or the pool stops); returns the new epoch.
    fn wait_for_epoch(&self, seen: u64) -> u64 {
        let changed = || {
            let e = self.epoch.load(SeqCst);
            (e != seen || self.stop.load(SeqCst)).then_some(e)
        };
        let start = Instant::now();
        loop {
            if let Some(e) = changed() {
                return e;
            }
            let idle = start.elapsed();
            if idle < SPIN {
                std::hint::spin_loop();
            } else if idle < SPIN + YIELD {
                std::thread::yield_now();
            } else {
                break;
            }
        }
        let mut guard = self.sleep_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.sleepers.fetch_add(1, SeqCst);
        let e = loop {
            if let Some(e) = changed() {
                break e;
            }
            guard = self.wake.wait(guard).unwrap_or_else(|p| p.into_inner());
        };
        self.sleepers.fetch_sub(1, SeqCst);
        e
    }

    /// Publishes a new epoch and wakes sleeping workers.
    fn bump(&self) {
        self.epoch.fetch_add(1, SeqCst);
        if self.sleepers.load(SeqCst) > 0 {
            let _guard = self.sleep_lock.lock().unwrap_or_else(|p| p.into_inner());
            self.wake.notify_all();
        }
    }
}

/// A pool of hot worker threads plus the SIMD path kernels should use on it.
pub struct CpuPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    submit: Mutex<()>,
    threads: usize,
    isa: Isa,
    input_rounding: InputRounding,
}

impl std::fmt::Debug for CpuPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuPool")
            .field("threads", &self.threads)
            .field("isa", &self.isa)
            .field("input_rounding", &self.input_rounding)
            .finish()
    }
}

impl CpuPool {
    /// A pool of `threads` (0 = `std::thread::available_parallelism`), counting the thread that
    /// launches kernels, using the best available ISA.
    pub fn new(threads: usize) -> Result<Self, KernelError> {
        Self::with_isa(threads, Isa::detect())
    }

    /// A pool that forces `isa` (e.g. [`Isa::Scalar`] in tests); fails if the CPU lacks it.
    pub fn with_isa(threads: usize, isa: Isa) -> Result<Self, KernelError> {
        if !isa.is_supported() {
            return Err(KernelError::Pool(format!("ISA {isa} is not supported by this CPU")));
        }
        let threads = if threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .map_err(|e| KernelError::Pool(format!("available_parallelism: {e}")))?
        } else {
            threads
        };
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            closed: AtomicBool::new(true),
            active: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            sleep_lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut pool = CpuPool {
            shared,
            workers: Vec::new(),
            submit: Mutex::new(()),
            threads,
            isa,
            input_rounding: InputRounding::Bf16,
        };
        for i in 1..threads {
            let shared = Arc::clone(&pool.shared);
            let handle = std::thread::Builder::new()
                .name(format!("tessera-kernel-{i}"))
                .spawn(move || shared.worker_loop(i))
                .map_err(|e| KernelError::Pool(format!("spawning kernel thread {i}: {e}")))?;
            // On an error above, dropping `pool` stops and joins the workers started so far.
            pool.workers.push(handle);
        }
        Ok(pool)
    }

    /// Number of threads, the launching one included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The SIMD path kernels use on this pool.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// This pool with matmuls allowed to round their token rows as coarsely as `rounding` (the
    /// default is [`InputRounding::Bf16`]).
    pub fn with_input_rounding(mut self, rounding: InputRounding) -> Self {
        self.input_rounding = rounding;
        self
    }

    /// The coarsest rounding matmuls on this pool may give their token rows.
    pub fn input_rounding(&self) -> InputRounding {
        self.input_rounding
    }

    /// Calls `f(i)` for every `i < tasks`, spread over the pool; returns when all have run.
    ///
    /// Each thread first runs a contiguous share of the indices, in order, then helps with the
    /// rest (see `Job`). A launch from inside a task runs inline.
    ///
    /// # Panics
    /// If any task panicked (after every other task has run).
    pub fn run(&self, tasks: usize, f: impl Fn(usize) + Sync) {
        let inline = tasks <= 1 || self.workers.is_empty() || IN_TASK.with(Cell::get);
        let job = Job::new(&f, tasks, if inline { 1 } else { self.threads });
        if inline {
            job.work(0);
        } else {
            let _one_at_a_time = self.submit.lock().unwrap_or_else(|p| p.into_inner());
            let s = &*self.shared;
            s.job.store(std::ptr::from_ref(&job).cast::<()>().cast_mut(), SeqCst);
            s.closed.store(false, SeqCst);
            s.bump();
            job.work(0);
            s.closed.store(true, SeqCst);
            while s.active.load(SeqCst) != 0 {
                std::hint::spin_loop();
            }
            s.job.store(std::ptr::null_mut(), SeqCst);
        }
        assert!(!job.panicked.load(SeqCst), "a kernel task panicked");
    }

    /// The mean time for a value to go from the launching thread to a worker and back, over
    /// `iters` round trips through one cache line; `None` with fewer than two threads, from
    /// inside a task, or when a wait for the other side outlasts `patience` (counted from the
    /// call).
    ///
    /// This is what each hand-off of a launch costs. It is shortest between cores that share a
    /// cache and several times longer between cores that do not (on the AMD EPYC test host,
    /// about 90 ns within one core complex and about 330 ns across two), and a virtual
    /// machine's vCPUs may move between such placements while it runs.
    pub fn round_trip(&self, iters: usize, patience: Duration) -> Option<Duration> {
        if self.workers.is_empty() || iters == 0 || IN_TASK.with(Cell::get) {
            return None;
        }
        // 1 means the worker (task 1) has joined; then for i = 1, 2, … the launching thread
        // (task 0) serves 2i and the worker answers 2i + 1.
        let ball = CachePadded(AtomicU64::new(0));
        let elapsed = Mutex::new(None);
        let deadline = Instant::now() + patience;
        let wait_for = |value: u64| {
            while ball.0.load(SeqCst) != value {
                if Instant::now() > deadline {
                    return false;
                }
                std::hint::spin_loop();
            }
            true
        };
        // The two tasks run on two threads at once: whichever thread takes one cannot finish it
        // until the other runs, so another thread takes the other.
        self.run(2, |task| {
            if task == 1 {
                ball.0.store(1, SeqCst);
                for i in 1..=iters as u64 {
                    if !wait_for(2 * i) {
                        return;
                    }
                    ball.0.store(2 * i + 1, SeqCst);
                }
                return;
            }
            if !wait_for(1) {
                return;
            }
            let start = Instant::now();
            for i in 1..=iters as u64 {
                ball.0.store(2 * i, SeqCst);
                if !wait_for(2 * i + 1) {
                    return;
                }
            }
            *elapsed.lock().unwrap_or_else(|p| p.into_inner()) = Some(start.elapsed().div_f64(iters as f64));
        });
        elapsed.into_inner().unwrap_or_else(|p| p.into_inner())
    }

    /// Splits `data` into consecutive chunks of `chunk` elements (the last may be shorter) and
    /// calls `f(index, chunk)` for each, spread over the pool.
    ///
    /// # Panics
    /// If `chunk == 0` while `data` is not empty, or if a task panicked.
    pub fn chunks_mut<T: Send>(&self, data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
        if data.is_empty() {
            return;
        }
        assert!(chunk > 0, "chunk length must be positive");
        let len = data.len();
        let base = SendPtr(data.as_mut_ptr());
        self.run(len.div_ceil(chunk), |i| {
            let start = i * chunk;
            let n = chunk.min(len - start);
            // SAFETY: task `i` alone gets elements `start..start + n`, inside `data`, which stays
            // mutably borrowed until `run` returns.
            let part = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), n) };
            f(i, part);
        });
    }
}

/// A raw pointer tasks may share (each uses a disjoint range).
struct SendPtr<T>(*mut T);
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
// SAFETY: only used by `chunks_mut`, whose tasks touch disjoint elements of a `Send` type.
unsafe impl<T: Send> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

impl Drop for CpuPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        self.shared.bump();
        for w in self.workers.drain(..) {
            // A worker never panics (tasks are caught), so a join error cannot carry news.
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_and_isa() {
        let pool = CpuPool::with_isa(2, Isa::Scalar).unwrap();
        assert_eq!(pool.threads(), 2);
        assert_eq!(pool.isa(), Isa::Scalar);
        let auto = CpuPool::new(0).unwrap();
        assert!(auto.threads() >= 1);
        assert_eq!(auto.isa(), Isa::detect());
    }

    #[test]
    fn unsupported_isa_is_an_error() {
        for isa in [Isa::Avx512Bf16, Isa::Avx512, Isa::Avx2Fma, Isa::Scalar] {
            let res = CpuPool::with_isa(1, isa);
            assert_eq!(res.is_ok(), isa.is_supported());
        }
    }

    #[test]
    fn every_task_runs_once_across_many_launches() {
        for threads in [1, 2, 4] {
            let pool = CpuPool::with_isa(threads, Isa::Scalar).unwrap();
            for tasks in [0usize, 1, 2, 3, 17, 1000] {
                let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                pool.run(tasks, |i| {
                    hits[i].fetch_add(1, SeqCst);
                });
                assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "threads {threads} tasks {tasks}");
            }
        }
    }

    #[test]
    fn work_is_shared_and_workers_wake_after_sleeping() {
        let pool = CpuPool::with_isa(2, Isa::Scalar).unwrap();
        for pause in [Duration::ZERO, SPIN + YIELD + Duration::from_millis(20)] {
            std::thread::sleep(pause);
            // Each task waits (up to a generous deadline) until both threads have joined the
            // launch, so the test only fails if the worker never wakes.
            let names = Mutex::new(std::collections::HashSet::new());
            let deadline = Instant::now() + Duration::from_secs(10);
            pool.run(2, |_| {
                names.lock().unwrap().insert(std::thread::current().id());
                while names.lock().unwrap().len() < 2 && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
            assert_eq!(names.lock().unwrap().len(), 2, "after a pause of {pause:?}");
        }
    }

    #[test]
    fn chunks_cover_the_slice_and_nested_launches_run_inline() {
        let pool = CpuPool::with_isa(3, Isa::Scalar).unwrap();
        let mut data = vec![0usize; 103];
        pool.chunks_mut(&mut data, 10, |i, part| {
            assert!(part.len() == 10 || (i == 10 && part.len() == 3));
            pool.run(part.len(), |_| {});
            part.iter_mut().for_each(|v| *v = i + 1);
        });
        assert!(data.iter().enumerate().all(|(j, &v)| v == j / 10 + 1));
        pool.chunks_mut(&mut Vec::<u8>::new(), 0, |_, _| {});
    }

    #[test]
    fn a_round_trip_needs_a_worker() {
        let patience = Duration::from_secs(60);
        let two = CpuPool::with_isa(2, Isa::Scalar).unwrap();
        let rt = two.round_trip(50, patience).expect("the worker joins");
        assert!(rt > Duration::ZERO && rt < patience, "{rt:?}");
        assert!(two.round_trip(0, patience).is_none());
        // From inside a task a launch runs inline, so no partner could ever answer.
        two.run(2, |_| assert!(two.round_trip(10, patience).is_none()));
        assert!(CpuPool::with_isa(1, Isa::Scalar).unwrap().round_trip(10, patience).is_none());
    }

    #[test]
    fn a_panicking_task_fails_the_launch_but_not_the_pool() {
        let pool = CpuPool::with_isa(2, Isa::Scalar).unwrap();
        let ran = AtomicUsize::new(0);
        let res = catch_unwind(AssertUnwindSafe(|| {
            pool.run(8, |i| {
                ran.fetch_add(1, SeqCst);
                assert_ne!(i, 3, "task 3 fails");
            })
        }));
        assert!(res.is_err());
        assert_eq!(ran.load(SeqCst), 8);
        let after = AtomicUsize::new(0);
        pool.run(5, |_| {
            after.fetch_add(1, SeqCst);
        });
        assert_eq!(after.load(SeqCst), 5);
    }

    #[test]
    fn concurrent_launches_from_two_threads_do_not_mix() {
        let pool = CpuPool::with_isa(2, Isa::Scalar).unwrap();
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..200 {
                        let sum = AtomicUsize::new(0);
                        pool.run(10, |i| {
                            sum.fetch_add(i, SeqCst);
                        });
                        assert_eq!(sum.load(SeqCst), 45);
                    }
                });
            }
        });
    }
}
