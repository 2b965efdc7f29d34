//! The thread pool kernels run on, and the SIMD path they use.
//!
//! A [`CpuPool`] of `threads` runs each parallel kernel on `threads - 1` worker threads plus the
//! calling thread. A forward pass launches about ten kernels per layer, each a few microseconds
//! to a few hundred microseconds long, so the cost that matters is the hand-off between them.
//! Workers stay hot between launches — they spin for `SPIN`, then yield the core for up to
//! `YIELD`, and only then sleep on a condition variable — and a launch is built so that each
//! hand-off moves as few cache lines between cores as it can (between the two core complexes of
//! the test host each line takes about 165 ns, half a measured round trip):
//! - everything a worker needs to start is in the one line it spins on (`Launch`);
//! - each thread claims tasks from a word on its own lines, tagged with the launch it belongs
//!   to, so nobody resets it between launches and a thread touches another's word only to help
//!   with what is left of that thread's share;
//! - each worker reports on its own line (`Lane::state`), which the launching thread reads once
//!   its own work is done; nothing is allocated per launch.
//!
//! Invariants:
//! - A launch's closure lives on the submitter's stack. A worker reads the `Launch` descriptor
//!   and runs tasks only between *joining* (storing `(epoch, JOINED)` in its state, then seeing
//!   the launch still current and not closed) and *leaving* (storing `(epoch, LEFT)`). The
//!   submitter returns only after every task is claimed and, for each worker, it has seen the
//!   worker leave this launch or not join it; a worker it has not seen join is first shut out
//!   by closing the launch. Joining and closing are `SeqCst` store-then-load pairs, so either
//!   the submitter sees the join and waits, or the worker sees the close and backs out.
//! - A claim word holds `(launch tag, next index)` and only moves by compare-and-swap; claims
//!   happen only inside a launch, so a word tagged with another launch is simply stale and is
//!   restarted at its share's start. Every launch tags every word (the submitter visits all
//!   shares), so a 32-bit tag cannot be mistaken for an older launch's.
//! - One job runs at a time (the submit lock); a launch from inside a task runs inline.
//! - A panicking task does not kill a worker: the panic is caught, the remaining tasks still run,
//!   and the submitter panics after the launch is over.

use std::cell::{Cell, UnsafeCell};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
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

/// A value alone on its cache lines: 128 bytes, as the adjacent-line prefetcher of x86 cores pulls
/// lines in pairs.
#[repr(align(128))]
struct CachePadded<T>(T);

/// What one launch runs: `tasks` calls of the closure at `data`, through `call`.
#[derive(Clone, Copy)]
struct Task {
    /// `call_task::<F>` for the closure's type `F`.
    call: unsafe fn(*const (), usize),
    /// The closure, on the submitter's stack.
    data: *const (),
    tasks: usize,
}

/// Calls the closure behind `data` on task `i`.
///
/// # Safety
/// `data` must point to a live `F`.
unsafe fn call_task<F: Fn(usize) + Sync>(data: *const (), i: usize) {
    // SAFETY: the caller guarantees `data` is a live `F`; `F: Sync` allows the shared call.
    unsafe { (*data.cast::<F>())(i) }
}

/// The line workers spin on: the newest launch's number, the newest closed one, and what it runs.
struct Launch {
    /// Bumped once per launch (and once at shutdown); launch numbers start at 1.
    epoch: AtomicU64,
    /// The newest launch the submitter has closed to workers that have not joined it.
    closed: AtomicU64,
    /// Written by the submitter before it publishes `epoch`, and only while no worker is joined;
    /// read by a worker only while it is joined to that launch (module invariant).
    task: UnsafeCell<Option<Task>>,
}

/// A worker state: the launch it last joined or left, and which.
const JOINED: u64 = 0;
const LEFT: u64 = 1;
fn state(epoch: u64, phase: u64) -> u64 {
    (epoch << 1) | phase
}

/// One thread's claim word and (for workers) its state, each alone on its lines.
struct Lane {
    /// `(launch tag << 32) | next index` of this thread's share.
    claim: CachePadded<AtomicU64>,
    /// `state(epoch, JOINED | LEFT)` of the last launch this worker looked at.
    state: CachePadded<AtomicU64>,
}

/// The share of `tasks` that thread `slot` of `threads` starts on: contiguous, in index order.
fn share(tasks: usize, slot: usize, threads: usize) -> (usize, usize) {
    (tasks * slot / threads, tasks * (slot + 1) / threads)
}

/// Claims the next task of a share from its claim word, for the launch tagged `tag`.
fn claim(word: &AtomicU64, tag: u32, (start, end): (usize, usize)) -> Option<usize> {
    let tagged = |i: usize| (u64::from(tag) << 32) | i as u64;
    let mut cur = word.load(Relaxed);
    loop {
        let current = (cur >> 32) as u32 == tag;
        let next = if current { (cur & u64::from(u32::MAX)) as usize } else { start };
        if next >= end {
            if !current {
                // Tag the exhausted (empty) share, so that no stale index outlives 2^32 launches.
                let _ = word.compare_exchange(cur, tagged(end), Relaxed, Relaxed);
            }
            return None;
        }
        match word.compare_exchange_weak(cur, tagged(next + 1), Relaxed, Relaxed) {
            Ok(_) => return Some(next),
            Err(now) => cur = now,
        }
    }
}

/// State shared by the submitter and the workers.
struct Shared {
    launch: CachePadded<Launch>,
    /// One per thread, by slot; slot 0 is the launching thread (its `state` is unused).
    lanes: Box<[Lane]>,
    /// Set by a task that panicked; taken by the submitter when the launch is over.
    panicked: AtomicBool,
    stop: AtomicBool,
    /// Workers asleep on `wake` (a launch notifies only when some are).
    sleepers: AtomicUsize,
    sleep_lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: the only non-`Sync` parts are `Launch::task` and the closure it points to. The module
// invariant makes every write of `task` happen while no worker may read it, and every read
// happen-after the write it sees (through `epoch`); the closure is `Sync` and outlives every call.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw pointer in `task` is only followed under the module invariant.
unsafe impl Send for Shared {}

impl Shared {
    fn new(threads: usize) -> Self {
        let lane =
            |_| Lane { claim: CachePadded(AtomicU64::new(0)), state: CachePadded(AtomicU64::new(state(0, LEFT))) };
        Shared {
            launch: CachePadded(Launch {
                epoch: AtomicU64::new(0),
                closed: AtomicU64::new(0),
                task: UnsafeCell::new(None),
            }),
            lanes: (0..threads).map(lane).collect(),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            sleep_lock: Mutex::new(()),
            wake: Condvar::new(),
        }
    }

    /// A worker's life. It starts from epoch 0, the pool's initial epoch, so a launch that
    /// comes before the thread first runs is still seen.
    fn worker_loop(&self, slot: usize) {
        let launch = &self.launch.0;
        let my_state = &self.lanes[slot].state.0;
        let mut seen = 0;
        loop {
            seen = self.wait_for_epoch(seen);
            if self.stop.load(SeqCst) {
                return;
            }
            my_state.store(state(seen, JOINED), SeqCst);
            if launch.epoch.load(SeqCst) == seen && launch.closed.load(SeqCst) < seen {
                // SAFETY: joined to the current, open launch: the submitter wrote `task` before
                // publishing `seen` and waits for us to leave before it writes it again.
                if let Some(task) = unsafe { *launch.task.get() } {
                    self.work(task, slot, seen);
                }
            }
            my_state.store(state(seen, LEFT), SeqCst);
        }
    }

    /// Claims and runs tasks of launch `epoch`, own share first, until none are left.
    fn work(&self, task: Task, slot: usize, epoch: u64) {
        let was = IN_TASK.with(|t| t.replace(true));
        let n = self.lanes.len();
        for s in (0..n).map(|k| (slot + k) % n) {
            let bounds = share(task.tasks, s, n);
            while let Some(i) = claim(&self.lanes[s].claim.0, epoch as u32, bounds) {
                // SAFETY: a task is claimed only inside its launch, while the submitter keeps
                // the closure alive (module invariant).
                if catch_unwind(AssertUnwindSafe(|| unsafe { (task.call)(task.data, i) })).is_err() {
                    self.panicked.store(true, SeqCst);
                }
            }
        }
        IN_TASK.with(|t| t.set(was));
    }

    /// Runs `task` as launch `epoch` on this thread (slot 0) and the workers; returns once every
    /// task has run and no worker can touch the launch any more. The caller holds the submit
    /// lock.
    fn launch(&self, task: Task, epoch: u64) {
        let launch = &self.launch.0;
        // SAFETY: every worker has left the previous launch or been shut out of it, so none
        // reads `task` now (module invariant).
        unsafe { *launch.task.get() = Some(task) };
        self.publish(epoch);
        self.work(task, 0, epoch);
        // Every task is claimed; wait for the workers that joined to finish theirs.
        let mut closed = false;
        for lane in &self.lanes[1..] {
            loop {
                let now = lane.state.0.load(SeqCst);
                if now == state(epoch, LEFT) {
                    break;
                }
                if now == state(epoch, JOINED) {
                    std::hint::spin_loop();
                } else if !closed {
                    // Not joined (yet): shut it out, then look again in case it just joined.
                    launch.closed.store(epoch, SeqCst);
                    closed = true;
                } else {
                    break;
                }
            }
        }
    }

    /// Waits until the epoch differs from `seen` (or the pool stops); returns the new epoch.
    fn wait_for_epoch(&self, seen: u64) -> u64 {
        let epoch = &self.launch.0.epoch;
        let changed = || {
            let e = epoch.load(SeqCst);
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

    /// Publishes `epoch` and wakes sleeping workers.
    fn publish(&self, epoch: u64) {
        self.launch.0.epoch.store(epoch, SeqCst);
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
        let shared = Arc::new(Shared::new(threads));
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
    /// rest (see `claim`). A launch from inside a task runs inline.
    ///
    /// # Panics
    /// If any task panicked (after every other task has run), or if `tasks` is 2^32 or more
    /// (before any has run).
    pub fn run<F: Fn(usize) + Sync>(&self, tasks: usize, f: F) {
        assert!(u32::try_from(tasks).is_ok(), "a launch takes fewer than 2^32 tasks, not {tasks}");
        let panicked = if tasks <= 1 || self.workers.is_empty() || IN_TASK.with(Cell::get) {
            run_inline(tasks, &f)
        } else {
            let _one_at_a_time = self.submit.lock().unwrap_or_else(|p| p.into_inner());
            let s = &*self.shared;
            // Only a submitter holding the lock (or the pool's drop) moves the epoch.
            let epoch = s.launch.0.epoch.load(Relaxed) + 1;
            let data = std::ptr::from_ref(&f).cast::<()>();
            s.launch(Task { call: call_task::<F>, data, tasks }, epoch);
            s.panicked.swap(false, SeqCst)
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

/// Runs every task on this thread, as a launch from inside a task does; true if one panicked.
fn run_inline(tasks: usize, f: &dyn Fn(usize)) -> bool {
    let was = IN_TASK.with(|t| t.replace(true));
    let mut panicked = false;
    for i in 0..tasks {
        panicked |= catch_unwind(AssertUnwindSafe(|| f(i))).is_err();
    }
    IN_TASK.with(|t| t.set(was));
    panicked
}

impl Drop for CpuPool {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.stop.store(true, SeqCst);
        s.publish(s.launch.0.epoch.load(Relaxed) + 1);
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
    fn a_claim_word_restarts_for_a_new_launch_and_tags_empty_shares() {
        let word = AtomicU64::new((7 << 32) | 40);
        // Launch 7's word is stale for launch 8: its share starts over at its own start.
        assert_eq!(claim(&word, 8, (3, 5)), Some(3));
        assert_eq!(claim(&word, 8, (3, 5)), Some(4));
        assert_eq!(claim(&word, 8, (3, 5)), None);
        assert_eq!(word.load(SeqCst), (8 << 32) | 5);
        // An empty share is still tagged with the launch that found it empty.
        assert_eq!(claim(&word, 9, (6, 6)), None);
        assert_eq!(word.load(SeqCst), (9 << 32) | 6);
        // Tags wrap with the epoch: launch 2^32 + 1 is tagged 1 and still restarts a word of 0.
        let word = AtomicU64::new(2);
        assert_eq!(claim(&word, (1u64 << 32 | 1) as u32, (0, 1)), Some(0));
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
