//! The exact KV index: which worker holds which prefix block, rebuilt from every worker's
//! `SubscribeKvEvents` stream (DESIGN.md, decision 3).
//!
//! Per worker the index keeps the set of block hashes it holds and the sequence number of the
//! last event applied. Invariants:
//! - `holders[h]` contains worker `w` exactly when `w`'s set contains `h` (the inverted map is
//!   only ever changed together with the per-worker sets);
//! - events are applied strictly in sequence: a worker's next event must be numbered
//!   `last + 1`, otherwise [`KvIndex::apply`] refuses it with [`SequenceGap`] and the caller
//!   resubscribes (from `last + 1`, or with a fresh snapshot), so the index never silently
//!   drifts from what the worker holds.
//!
//! Because block hashes are chained (decision 2), a worker can serve a prompt's block `i` from
//! cache only if it also holds blocks `0..i`; [`KvIndex::prefix_matches`] therefore counts the
//! leading run of a prompt's hashes each worker holds.

use std::collections::{HashMap, HashSet};

use super::WorkerSlot;

/// One change to a worker's cache, as its event stream reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockChange {
    /// The worker now holds this block.
    Stored(u64),
    /// The worker evicted this block.
    Removed(u64),
    /// The worker dropped every block.
    Cleared,
}

/// An event arrived out of order: the stream must be resumed or re-snapshotted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("KV event stream gap: expected event {expected}, got {got}")]
pub struct SequenceGap {
    /// The number the index expected.
    pub expected: u64,
    /// The number it got.
    pub got: u64,
}

#[derive(Debug, Default)]
struct WorkerBlocks {
    held: HashSet<u64>,
    last_seq: u64,
}

/// Block hash → workers holding it, for every worker that streams KV events.
#[derive(Debug, Default)]
pub struct KvIndex {
    holders: HashMap<u64, Vec<WorkerSlot>>,
    workers: HashMap<WorkerSlot, WorkerBlocks>,
}

impl KvIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces everything known about `worker` with a snapshot taken as of event `seq`.
    pub fn reset_worker(&mut self, worker: WorkerSlot, seq: u64, blocks: impl IntoIterator<Item = u64>) {
        self.remove_worker(worker);
        let entry = self.workers.entry(worker).or_default();
        entry.last_seq = seq;
        for h in blocks {
            if entry.held.insert(h) {
                self.holders.entry(h).or_default().push(worker);
            }
        }
    }

    /// Applies event `seq` of `worker`. The worker must have been reset first, and `seq` must
    /// follow the last applied number.
    pub fn apply(&mut self, worker: WorkerSlot, seq: u64, change: BlockChange) -> Result<(), SequenceGap> {
        let Some(entry) = self.workers.get_mut(&worker) else {
            return Err(SequenceGap { expected: 0, got: seq });
        };
        if seq != entry.last_seq + 1 {
            return Err(SequenceGap { expected: entry.last_seq + 1, got: seq });
        }
        entry.last_seq = seq;
        match change {
            BlockChange::Stored(h) => {
                if entry.held.insert(h) {
                    self.holders.entry(h).or_default().push(worker);
                }
            }
            BlockChange::Removed(h) => {
                if entry.held.remove(&h) {
                    unlink(&mut self.holders, h, worker);
                }
            }
            BlockChange::Cleared => {
                for h in entry.held.drain() {
                    unlink(&mut self.holders, h, worker);
                }
            }
        }
        Ok(())
    }

    /// Forgets `worker` entirely (it left, or its stream must be rebuilt from a snapshot).
    pub fn remove_worker(&mut self, worker: WorkerSlot) {
        if let Some(entry) = self.workers.remove(&worker) {
            for h in entry.held {
                unlink(&mut self.holders, h, worker);
            }
        }
    }

    /// Whether `worker`'s events are being indexed.
    pub fn tracks(&self, worker: WorkerSlot) -> bool {
        self.workers.contains_key(&worker)
    }

    /// The last event number applied for `worker`.
    pub fn last_seq(&self, worker: WorkerSlot) -> Option<u64> {
        self.workers.get(&worker).map(|e| e.last_seq)
    }

    /// The blocks `worker` holds (for comparisons between router replicas, and tests).
    pub fn blocks_of(&self, worker: WorkerSlot) -> Option<&HashSet<u64>> {
        self.workers.get(&worker).map(|e| &e.held)
    }

    /// For every tracked worker holding at least the first block: how many leading blocks of
    /// `hashes` (a prompt's chained block hashes, in order) it holds.
    pub fn prefix_matches(&self, hashes: &[u64]) -> HashMap<WorkerSlot, usize> {
        let mut matched: HashMap<WorkerSlot, usize> = HashMap::new();
        let Some(first) = hashes.first() else {
            return matched;
        };
        let Some(holders) = self.holders.get(first) else {
            return matched;
        };
        let mut alive: Vec<WorkerSlot> = holders.clone();
        for &w in &alive {
            matched.insert(w, 1);
        }
        for (i, h) in hashes.iter().enumerate().skip(1) {
            let Some(holders) = self.holders.get(h) else {
                break;
            };
            alive.retain(|w| holders.contains(w));
            if alive.is_empty() {
                break;
            }
            for &w in &alive {
                matched.insert(w, i + 1);
            }
        }
        matched
    }

    /// Checks the invariant between the inverted map and the per-worker sets (tests).
    pub fn check_invariants(&self) -> Result<(), String> {
        for (h, ws) in &self.holders {
            if ws.is_empty() {
                return Err(format!("block {h:#x} has an empty holder list"));
            }
            for w in ws {
                if !self.workers.get(w).is_some_and(|e| e.held.contains(h)) {
                    return Err(format!("block {h:#x} lists worker {w} which does not hold it"));
                }
            }
        }
        for (w, e) in &self.workers {
            for h in &e.held {
                if !self.holders.get(h).is_some_and(|ws| ws.contains(w)) {
                    return Err(format!("worker {w} holds {h:#x} but is not listed as a holder"));
                }
            }
        }
        Ok(())
    }
}

fn unlink(holders: &mut HashMap<u64, Vec<WorkerSlot>>, h: u64, worker: WorkerSlot) {
    if let Some(ws) = holders.get_mut(&h) {
        ws.retain(|w| *w != worker);
        if ws.is_empty() {
            holders.remove(&h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prefix_matches_count_leading_blocks_per_worker() {
        let mut idx = KvIndex::new();
        idx.reset_worker(1, 3, [10, 11, 12]);
        idx.reset_worker(2, 0, [10]);
        idx.reset_worker(3, 0, [11, 12]); // holds later blocks but not the first: no match
        let m = idx.prefix_matches(&[10, 11, 12, 13]);
        assert_eq!(m.get(&1), Some(&3));
        assert_eq!(m.get(&2), Some(&1));
        assert_eq!(m.get(&3), None);
        assert!(idx.prefix_matches(&[]).is_empty());
        assert!(idx.prefix_matches(&[99]).is_empty());
    }

    #[test]
    fn events_apply_in_sequence_and_gaps_are_refused() {
        let mut idx = KvIndex::new();
        assert_eq!(idx.apply(1, 1, BlockChange::Stored(5)), Err(SequenceGap { expected: 0, got: 1 }));
        idx.reset_worker(1, 4, []);
        idx.apply(1, 5, BlockChange::Stored(5)).unwrap();
        idx.apply(1, 6, BlockChange::Stored(6)).unwrap();
        assert_eq!(idx.apply(1, 8, BlockChange::Removed(5)), Err(SequenceGap { expected: 7, got: 8 }));
        assert_eq!(idx.prefix_matches(&[5, 6]).get(&1), Some(&2));
        idx.apply(1, 7, BlockChange::Removed(5)).unwrap();
        assert!(idx.prefix_matches(&[5, 6]).is_empty());
        idx.apply(1, 8, BlockChange::Cleared).unwrap();
        assert!(idx.blocks_of(1).is_some_and(|b| b.is_empty()));
        idx.check_invariants().unwrap();
        idx.remove_worker(1);
        assert!(!idx.tracks(1));
    }

    proptest! {
        /// Any mix of events over several workers keeps the inverted map equal to the sets, and
        /// matches equal a direct computation from the sets.
        #[test]
        fn index_matches_a_naive_model(ops in proptest::collection::vec((0u32..3, 0u8..4, 0u64..12), 0..200)) {
            let mut idx = KvIndex::new();
            let mut model: HashMap<WorkerSlot, HashSet<u64>> = HashMap::new();
            let mut seq: HashMap<WorkerSlot, u64> = HashMap::new();
            for w in 0..3 {
                idx.reset_worker(w, 0, []);
                model.insert(w, HashSet::new());
                seq.insert(w, 0);
            }
            for (w, op, h) in ops {
                let s = seq.entry(w).or_default();
                *s += 1;
                let set = model.entry(w).or_default();
                let change = match op {
                    0 | 1 => { set.insert(h); BlockChange::Stored(h) }
                    2 => { set.remove(&h); BlockChange::Removed(h) }
                    _ => { set.clear(); BlockChange::Cleared }
                };
                prop_assert!(idx.apply(w, *s, change).is_ok());
                prop_assert!(idx.check_invariants().is_ok());
            }
            let prompt: Vec<u64> = (0..6).collect();
            let got = idx.prefix_matches(&prompt);
            for (w, set) in &model {
                let lead = prompt.iter().take_while(|h| set.contains(h)).count();
                prop_assert_eq!(got.get(w).copied().unwrap_or(0), lead);
            }
        }
    }
}
