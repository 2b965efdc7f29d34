//! How a launch is handed between the submitting thread and the workers of one [`CpuPool`]:
//! the workers' hot wait, the claiming of tasks, and the hand-shake that ends a launch.
//!
//! Workers stay hot between launches — they spin for [`SPIN`], then yield the core for up to
//! [`YIELD`], and only then sleep on a condition variable — and a launch is built so that each
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
//! - One launch runs at a time (`Shared::submit`); a launch from inside a task runs inline.
//! - A panicking task does not kill a worker: the panic is caught, the remaining tasks still run,
//!   and the submitter learns of it when the launch is over.
//!
//! [`CpuPool`]: super::CpuPool

use std::cell::{Cell, UnsafeCell};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long an idle worker busy-waits for the next launch.
pub(super) const SPIN: Duration = Duration::from_micros(100);
/// How long an idle worker then keeps polling between `yield_now` calls before it sleeps.
pub(super) const YIELD: Duration = Duration::from_millis(2);

thread_local! {
    /// Set while this thread runs a task of some pool (a nested launch then runs inline).
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread is running a task of some pool.
pub(super) fn in_task() -> bool {
    IN_TASK.with(Cell::get)
}

/// Runs `body` marked as a task of a pool.
fn as_task<R>(body: impl FnOnce() -> R) -> R {
    let was = IN_TASK.with(|t| t.replace(true));
    let result = body();
    IN_TASK.with(|t| t.set(was));
    result
}

/// Runs one task, catching its panic; true if it panicked.
fn panics(task: impl FnOnce()) -> bool {
    catch_unwind(AssertUnwindSafe(task)).is_err()
}

/// Runs every task on this thread, as a launch from inside a task does; true if one panicked.
pub(super) fn run_inline(tasks: usize, f: &dyn Fn(usize)) -> bool {
    as_task(|| (0..tasks).fold(false, |panicked, i| panics(|| f(i)) | panicked))
}

/// A value alone on its cache lines: 128 bytes, as the adjacent-line prefetcher of x86 cores pulls
/// lines in pairs.
#[repr(align(128))]
pub(super) struct CachePadded<T>(pub(super) T);

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

/// The phases of a worker's state.
const JOINED: u64 = 0;
const LEFT: u64 = 1;

/// A worker's state: the launch it last joined or left, and which of the two (`phase`).
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
pub(super) struct Shared {
    launch: CachePadded<Launch>,
    /// One per thread, by slot; slot 0 is the launching thread (its `state` is unused).
    lanes: Box<[Lane]>,
    /// Held by the submitter for a whole launch: one runs at a time.
    submit: Mutex<()>,
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
    /// The state of a pool of `threads`, the launching one included.
    pub(super) fn new(threads: usize) -> Self {
        let lane =
            |_| Lane { claim: CachePadded(AtomicU64::new(0)), state: CachePadded(AtomicU64::new(state(0, LEFT))) };
        Shared {
            launch: CachePadded(Launch {
                epoch: AtomicU64::new(0),
                closed: AtomicU64::new(0),
                task: UnsafeCell::new(None),
            }),
            lanes: (0..threads).map(lane).collect(),
            submit: Mutex::new(()),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            sleep_lock: Mutex::new(()),
            wake: Condvar::new(),
        }
    }

    /// A worker's life. It starts from epoch 0, the pool's initial epoch, so a launch that
    /// comes before the thread first runs is still seen.
    pub(super) fn worker_loop(&self, slot: usize) {
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
        as_task(|| {
            let n = self.lanes.len();
            for s in (0..n).map(|k| (slot + k) % n) {
                let bounds = share(task.tasks, s, n);
                while let Some(i) = claim(&self.lanes[s].claim.0, epoch as u32, bounds) {
                    // SAFETY: a task is claimed only inside its launch, while the submitter keeps
                    // the closure alive (module invariant).
                    if panics(|| unsafe { (task.call)(task.data, i) }) {
                        self.panicked.store(true, SeqCst);
                    }
                }
            }
        });
    }

    /// Runs `f` on every `i < tasks` (fewer than 2^32) on this thread and the workers, one launch
    /// at a time; returns once all have run and no worker can touch `f` any more, true if a task
    /// panicked.
    pub(super) fn run<F: Fn(usize) + Sync>(&self, tasks: usize, f: &F) -> bool {
        let _one_at_a_time = self.submit.lock().unwrap_or_else(|p| p.into_inner());
        // Only a submitter holding the lock (or `shut_down`, which has the pool to itself) moves the epoch.
        let epoch = self.launch.0.epoch.load(Relaxed) + 1;
        let data = std::ptr::from_ref(f).cast::<()>();
        self.launch(Task { call: call_task::<F>, data, tasks }, epoch);
        self.panicked.swap(false, SeqCst)
    }

    /// Tells every worker to return from [`Shared::worker_loop`]; the caller has the pool to
    /// itself (no launch runs).
    pub(super) fn shut_down(&self) {
        self.stop.store(true, SeqCst);
        self.publish(self.launch.0.epoch.load(Relaxed) + 1);
    }

    /// Runs `task` as launch `epoch` on this thread (slot 0) and the workers; returns once every
    /// task has run and no worker can touch the launch any more. The caller holds `submit`.
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
