//! Collectives between rank threads of one process, through shared memory.
//!
//! One mutex-protected round at a time: each rank deposits its input in its own slot; the last
//! rank to arrive computes the result (sums in rank order, so results are deterministic and
//! identical on every rank) and wakes the others, who copy it out. A new round starts only after
//! every rank has read the previous result. Invariants: at most one round is being gathered; a
//! round's op and length are fixed by its first arrival and every later arrival must match; once
//! `aborted` is set it never clears, and every wait re-checks it.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::{CommError, Communicator};

/// Called once, with the reason, when the group is aborted (from whichever thread aborts it),
/// before any rank can see the abort: whoever learns of the failure from a collective's error
/// finds the hook's effect already done. It runs under the group's lock, so it must not call
/// back into the group.
pub type AbortHook = Arc<dyn Fn(&str) + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    AllReduceSum,
    AllGather,
    Broadcast { root: usize },
    Barrier,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AllReduceSum => "all_reduce_sum",
            Op::AllGather => "all_gather",
            Op::Broadcast { .. } => "broadcast",
            Op::Barrier => "barrier",
        }
    }
}

struct State {
    /// Completed rounds.
    round: u64,
    /// Op and per-rank length of the round being gathered, set by its first arrival.
    current: Option<(Op, usize)>,
    arrived: Vec<bool>,
    slots: Vec<Vec<f32>>,
    result: Vec<f32>,
    /// Ranks that have not yet read the last completed round's result.
    unread: Vec<bool>,
    aborted: Option<String>,
}

struct Shared {
    size: usize,
    timeout: Duration,
    state: Mutex<State>,
    changed: Condvar,
    on_abort: Option<AbortHook>,
}

/// One rank's handle on a shared-memory group.
pub struct HostComm {
    rank: usize,
    shared: Arc<Shared>,
}

/// Creates a group of `size` ranks whose collectives wait at most `timeout`; hand one handle to
/// each rank thread (index = rank). `on_abort` is called once when the group is aborted.
pub fn host_group(size: usize, timeout: Duration, on_abort: Option<AbortHook>) -> Vec<HostComm> {
    let size = size.max(1);
    let shared = Arc::new(Shared {
        size,
        timeout,
        state: Mutex::new(State {
            round: 0,
            current: None,
            arrived: vec![false; size],
            slots: vec![Vec::new(); size],
            result: Vec::new(),
            unread: vec![false; size],
            aborted: None,
        }),
        changed: Condvar::new(),
        on_abort,
    });
    (0..size).map(|rank| HostComm { rank, shared: shared.clone() }).collect()
}

/// What a collective reads from and writes to.
enum Io<'a> {
    InPlace(&'a mut [f32]),
    Gather { send: &'a [f32], recv: &'a mut [f32] },
    Nothing,
}

enum Wait {
    TimedOut,
    Aborted(String),
}

impl HostComm {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code holding the lock can panic (lengths are checked before copying), so a
        // poisoned lock still holds consistent state.
        self.shared.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until `done` holds, the deadline passes, or the group is aborted.
    fn wait_until<'a>(
        &self,
        mut st: MutexGuard<'a, State>,
        deadline: Instant,
        done: impl Fn(&State) -> bool,
    ) -> Result<MutexGuard<'a, State>, (MutexGuard<'a, State>, Wait)> {
        loop {
            if let Some(reason) = &st.aborted {
                let reason = reason.clone();
                return Err((st, Wait::Aborted(reason)));
            }
            if done(&st) {
                return Ok(st);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err((st, Wait::TimedOut));
            }
            st = self.shared.changed.wait_timeout(st, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// Marks the group aborted (keeping the first reason), runs the hook if this call was the
    /// one that aborted it, and then wakes every waiter.
    fn fail(&self, mut st: MutexGuard<'_, State>, reason: String) {
        if st.aborted.is_none() {
            // Still under the lock: no rank observes the abort before the hook has run.
            if let Some(hook) = &self.shared.on_abort {
                hook(&reason);
            }
            st.aborted = Some(reason);
        }
        drop(st);
        self.shared.changed.notify_all();
    }

    fn timeout_error(&self, st: MutexGuard<'_, State>, op: Op, missing: Vec<usize>, started: Instant) -> CommError {
        let err = CommError::Timeout { op: op.name(), missing, waited: started.elapsed() };
        self.fail(st, format!("rank {}: {err}", self.rank));
        err
    }

    fn run(&self, op: Op, len: usize, mut io: Io<'_>) -> Result<(), CommError> {
        let started = Instant::now();
        // A timeout too large to add (`Duration::MAX`) means "a year": in effect, never.
        let deadline =
            started.checked_add(self.shared.timeout).unwrap_or_else(|| started + Duration::from_secs(365 * 24 * 3600));
        let rank = self.rank;
        let st = self.lock();
        // The previous round's result must be read by everyone before its buffer is reused.
        let mut st = match self.wait_until(st, deadline, |s| !s.unread.iter().any(|&u| u)) {
            Ok(st) => st,
            Err((_, Wait::Aborted(r))) => return Err(CommError::Aborted(r)),
            Err((st, Wait::TimedOut)) => {
                let missing = (0..self.shared.size).filter(|&r| st.unread[r]).collect();
                return Err(self.timeout_error(st, op, missing, started));
            }
        };
        match st.current {
            None => st.current = Some((op, len)),
            Some(c) if c == (op, len) => {}
            Some((other, other_len)) => {
                let msg = format!(
                    "rank {rank} called {}({len} values) while other ranks are in {}({other_len} values)",
                    op.name(),
                    other.name()
                );
                self.fail(st, msg.clone());
                return Err(CommError::Mismatch(msg));
            }
        }
        let deposit: &[f32] = match (&io, op) {
            (_, Op::Barrier) => &[],
            (_, Op::Broadcast { root }) if root != rank => &[],
            (Io::InPlace(buf), _) => buf,
            (Io::Gather { send, .. }, _) => send,
            (Io::Nothing, _) => &[],
        };
        let slot = &mut st.slots[rank];
        slot.clear();
        slot.extend_from_slice(deposit);
        st.arrived[rank] = true;
        let my_round = st.round;
        if st.arrived.iter().all(|&a| a) {
            let State { slots, result, .. } = &mut *st;
            result.clear();
            match op {
                Op::AllReduceSum => {
                    result.extend_from_slice(&slots[0]);
                    for s in &slots[1..] {
                        result.iter_mut().zip(s).for_each(|(r, x)| *r += x);
                    }
                }
                Op::AllGather => slots.iter().for_each(|s| result.extend_from_slice(s)),
                Op::Broadcast { root } => result.extend_from_slice(&slots[root]),
                Op::Barrier => {}
            }
            st.round += 1;
            st.current = None;
            st.arrived.fill(false);
            st.unread.fill(true);
            self.shared.changed.notify_all();
        } else {
            st = match self.wait_until(st, deadline, |s| s.round != my_round) {
                Ok(st) => st,
                Err((_, Wait::Aborted(r))) => return Err(CommError::Aborted(r)),
                Err((st, Wait::TimedOut)) => {
                    let missing = (0..self.shared.size).filter(|&r| !st.arrived[r]).collect();
                    return Err(self.timeout_error(st, op, missing, started));
                }
            };
        }
        match &mut io {
            Io::InPlace(buf) => buf.copy_from_slice(&st.result),
            Io::Gather { recv, .. } => recv.copy_from_slice(&st.result),
            Io::Nothing => {}
        }
        st.unread[rank] = false;
        if !st.unread.iter().any(|&u| u) {
            self.shared.changed.notify_all();
        }
        Ok(())
    }

    fn aborted(&self) -> Result<(), CommError> {
        match &self.lock().aborted {
            Some(r) => Err(CommError::Aborted(r.clone())),
            None => Ok(()),
        }
    }
}

impl Communicator for HostComm {
    type Buffer = [f32];

    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        if self.shared.size == 1 {
            return self.aborted();
        }
        let len = buf.len();
        self.run(Op::AllReduceSum, len, Io::InPlace(buf))
    }

    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<(), CommError> {
        if recv.len() != send.len() * self.shared.size {
            let msg = format!(
                "rank {}: all_gather of {} values into {} (expected {} ranks × {})",
                self.rank,
                send.len(),
                recv.len(),
                self.shared.size,
                send.len()
            );
            self.fail(self.lock(), msg.clone());
            return Err(CommError::Mismatch(msg));
        }
        if self.shared.size == 1 {
            recv.copy_from_slice(send);
            return self.aborted();
        }
        self.run(Op::AllGather, send.len(), Io::Gather { send, recv })
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        if root >= self.shared.size {
            let msg = format!("rank {}: broadcast from rank {root} of a {}-rank group", self.rank, self.shared.size);
            self.fail(self.lock(), msg.clone());
            return Err(CommError::Mismatch(msg));
        }
        if self.shared.size == 1 {
            return self.aborted();
        }
        let len = buf.len();
        self.run(Op::Broadcast { root }, len, Io::InPlace(buf))
    }

    fn barrier(&self) -> Result<(), CommError> {
        if self.shared.size == 1 {
            return self.aborted();
        }
        self.run(Op::Barrier, 0, Io::Nothing)
    }

    fn abort(&self, reason: &str) {
        self.fail(self.lock(), reason.to_string());
    }

    fn abort_reason(&self) -> Option<String> {
        self.lock().aborted.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn on_threads<T: Send + 'static>(
        comms: Vec<HostComm>,
        f: impl Fn(HostComm) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let f = Arc::new(f);
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let f = f.clone();
                std::thread::spawn(move || f(c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn collectives_agree_on_every_rank_over_many_rounds() {
        let comms = host_group(3, Duration::from_secs(10), None);
        let results = on_threads(comms, |c| {
            let r = c.rank() as f32;
            let mut out = Vec::new();
            for round in 0..200 {
                let mut buf = vec![r + round as f32, 1.0];
                c.all_reduce_sum(&mut buf).unwrap();
                out.push(buf);
                let mut gathered = vec![0.0; 6];
                c.all_gather(&[r, -r], &mut gathered).unwrap();
                out.push(gathered);
                let mut b = vec![r; 3];
                c.broadcast(&mut b, round % 3).unwrap();
                out.push(b);
                c.barrier().unwrap();
            }
            out
        });
        for round in 0..200 {
            let base = round as f32 * 3.0;
            assert_eq!(results[0][round * 3], vec![base + 3.0, 3.0]);
            assert_eq!(results[0][round * 3 + 1], vec![0.0, -0.0, 1.0, -1.0, 2.0, -2.0]);
            assert_eq!(results[0][round * 3 + 2], vec![(round % 3) as f32; 3]);
        }
        assert!(results.iter().all(|r| *r == results[0]));
    }

    #[test]
    fn a_rank_that_never_comes_times_out_the_group_and_names_it() {
        let aborts = Arc::new(AtomicUsize::new(0));
        let counter = aborts.clone();
        let hook: AbortHook = Arc::new(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let mut comms = host_group(3, Duration::from_millis(200), Some(hook));
        let absent = comms.pop().unwrap();
        let results = on_threads(comms, |c| {
            let mut buf = vec![1.0];
            c.all_reduce_sum(&mut buf)
        });
        for r in &results {
            match r {
                Err(CommError::Timeout { missing, .. }) => assert_eq!(missing, &vec![2]),
                Err(CommError::Aborted(reason)) => assert!(reason.contains("[2]"), "{reason}"),
                other => panic!("expected a timeout, got {other:?}"),
            }
        }
        assert_eq!(aborts.load(Ordering::SeqCst), 1, "the hook runs once");
        assert!(matches!(absent.barrier(), Err(CommError::Aborted(_))));
    }

    #[test]
    fn abort_wakes_waiting_ranks_at_once() {
        let comms = host_group(2, Duration::from_secs(60), None);
        let mut it = comms.into_iter();
        let (a, b) = (it.next().unwrap(), it.next().unwrap());
        let waiter = std::thread::spawn(move || {
            let started = Instant::now();
            (a.barrier(), started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(50));
        b.abort("rank 1 panicked");
        let (result, waited) = waiter.join().unwrap();
        assert_eq!(result, Err(CommError::Aborted("rank 1 panicked".into())));
        assert!(waited < Duration::from_secs(5));
        assert_eq!(b.abort_reason().as_deref(), Some("rank 1 panicked"));
    }

    #[test]
    fn a_rank_that_sees_the_abort_finds_the_hook_already_run() {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = done.clone();
        let hook: AbortHook = Arc::new(move |_| {
            std::thread::sleep(Duration::from_millis(50));
            flag.store(true, Ordering::SeqCst);
        });
        let mut it = host_group(2, Duration::from_secs(60), Some(hook)).into_iter();
        let (a, b) = (it.next().unwrap(), it.next().unwrap());
        let seen = done.clone();
        // What the waiter finds at the moment its collective fails.
        let waiter = std::thread::spawn(move || (a.barrier(), seen.load(Ordering::SeqCst)));
        std::thread::sleep(Duration::from_millis(20));
        b.abort("rank 1 failed");
        let (result, hook_done) = waiter.join().unwrap();
        assert!(matches!(result, Err(CommError::Aborted(_))));
        assert!(hook_done, "the waiter saw the abort before the hook ran");
    }

    #[test]
    fn mismatched_collectives_fail_instead_of_mixing_data() {
        let comms = host_group(2, Duration::from_secs(10), None);
        let results = on_threads(comms, |c| {
            if c.rank() == 0 {
                let mut buf = vec![0.0; 4];
                c.all_reduce_sum(&mut buf)
            } else {
                let mut buf = vec![0.0; 5];
                c.all_reduce_sum(&mut buf)
            }
        });
        assert!(results.iter().all(|r| matches!(r, Err(CommError::Mismatch(_) | CommError::Aborted(_)))));
        assert!(results.iter().any(|r| matches!(r, Err(CommError::Mismatch(_)))));
    }

    #[test]
    fn a_single_rank_group_is_the_identity() {
        let c = host_group(1, Duration::from_secs(1), None).pop().unwrap();
        let mut buf = vec![1.0, 2.0];
        c.all_reduce_sum(&mut buf).unwrap();
        let mut out = vec![0.0; 2];
        c.all_gather(&buf, &mut out).unwrap();
        assert_eq!(out, buf);
        c.barrier().unwrap();
    }
}
