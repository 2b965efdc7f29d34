//! The thread pool kernels run on, and the SIMD path they use.
//!
//! A [`CpuPool`] of `threads` runs each parallel kernel on `threads - 1` worker threads plus the
//! calling thread. A forward pass launches about ten kernels per layer, each a few microseconds
//! to a few hundred microseconds long, so the cost that matters is the hand-off between them:
//! workers stay hot between launches, and a launch moves as few cache lines between cores as it
//! can (`launch`, which states the hand-off's invariants). One launch runs at a time; a launch
//! from inside a task runs inline; a panicking task does not kill a worker, and the launch that
//! ran it panics once every other task has run.

mod launch;

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use self::launch::{CachePadded, Shared, in_task, run_inline};
use crate::error::KernelError;
use crate::isa::Isa;
use crate::matmul::InputRounding;

/// A pool of hot worker threads plus the SIMD path kernels should use on it.
pub struct CpuPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
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
        let shared = Arc::new(Shared::new(threads));
        let mut pool = CpuPool { shared, workers: Vec::new(), threads, isa, input_rounding: InputRounding::Bf16 };
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
    /// rest (see `launch`). A launch from inside a task runs inline.
    ///
    /// # Panics
    /// If any task panicked (after every other task has run), or if `tasks` is 2^32 or more
    /// (before any has run).
    pub fn run<F: Fn(usize) + Sync>(&self, tasks: usize, f: F) {
        assert!(u32::try_from(tasks).is_ok(), "a launch takes fewer than 2^32 tasks, not {tasks}");
        let panicked = if tasks <= 1 || self.workers.is_empty() || in_task() {
            run_inline(tasks, &f)
        } else {
            self.shared.run(tasks, &f)
        };
        assert!(!panicked, "a kernel task panicked");
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
        if self.workers.is_empty() || iters == 0 || in_task() {
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
        self.shared.shut_down();
        for w in self.workers.drain(..) {
            // A worker never panics (tasks are caught), so a join error cannot carry news.
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::sync::atomic::AtomicUsize;

    use super::launch::{SPIN, YIELD};
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
        for isa in [Isa::Avx512Bf16, Isa::Avx512Vnni, Isa::Avx512, Isa::Avx2Fma, Isa::Scalar] {
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
    fn many_short_launches_run_each_task_once() {
        // Launches shorter than a hand-off, so that workers join late, leave late and find
        // launches closed or already finished.
        for threads in [2, 3] {
            let pool = CpuPool::with_isa(threads, Isa::Scalar).unwrap();
            for round in 0..20_000usize {
                let tasks = round % 7;
                let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                pool.run(tasks, |i| {
                    hits[i].fetch_add(1, SeqCst);
                });
                assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "threads {threads} round {round}");
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
        let too_many = catch_unwind(AssertUnwindSafe(|| pool.run(1 << 32, |_| panic!("no task runs"))));
        assert!(too_many.is_err());
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
