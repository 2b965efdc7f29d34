//! The approximate prefix view: per worker, an LRU of the block hashes this router has routed
//! to it. Used by the `prefix` policy for every worker, and by the `kv` policy for workers that
//! do not stream KV events (DESIGN.md, decision 3). It only knows what *this* router sent, and
//! guesses eviction by capacity, so it can be wrong both ways; the exact index replaces it
//! wherever events flow.
//!
//! Invariant: for each worker, `order` and `ticks` hold the same hashes, at most `capacity` of
//! them, and `ticks[h]` is `h`'s key in `order` (its last use).

use std::collections::{BTreeMap, HashMap};

use super::WorkerSlot;

#[derive(Debug)]
struct Lru {
    capacity: usize,
    ticks: HashMap<u64, u64>,
    order: BTreeMap<u64, u64>,
    clock: u64,
}

impl Lru {
    fn touch(&mut self, h: u64) {
        self.clock += 1;
        if let Some(old) = self.ticks.insert(h, self.clock) {
            self.order.remove(&old);
        }
        self.order.insert(self.clock, h);
        while self.ticks.len() > self.capacity {
            let Some((_, victim)) = self.order.pop_first() else { break };
            self.ticks.remove(&victim);
        }
    }
}

/// Per-worker LRUs of routed block hashes.
#[derive(Debug, Default)]
pub struct ApproxPrefixIndex {
    workers: HashMap<WorkerSlot, Lru>,
}

impl ApproxPrefixIndex {
    /// An empty view.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts (or resizes) `worker`'s LRU with room for `capacity_blocks` hashes.
    pub fn add_worker(&mut self, worker: WorkerSlot, capacity_blocks: usize) {
        let lru = self.workers.entry(worker).or_insert_with(|| Lru {
            capacity: capacity_blocks,
            ticks: HashMap::new(),
            order: BTreeMap::new(),
            clock: 0,
        });
        lru.capacity = capacity_blocks;
    }

    /// Forgets `worker`.
    pub fn remove_worker(&mut self, worker: WorkerSlot) {
        self.workers.remove(&worker);
    }

    /// Records that a prompt with these chained block hashes was routed to `worker`.
    pub fn record(&mut self, worker: WorkerSlot, hashes: &[u64]) {
        if let Some(lru) = self.workers.get_mut(&worker) {
            for &h in hashes {
                lru.touch(h);
            }
        }
    }

    /// How many leading blocks of `hashes` this router believes `worker` holds.
    pub fn matched(&self, worker: WorkerSlot, hashes: &[u64]) -> usize {
        self.workers.get(&worker).map_or(0, |lru| hashes.iter().take_while(|h| lru.ticks.contains_key(h)).count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_routed_prefixes_and_evicts_the_least_recent() {
        let mut a = ApproxPrefixIndex::new();
        a.add_worker(1, 4);
        a.record(1, &[1, 2, 3]);
        assert_eq!(a.matched(1, &[1, 2, 3, 4]), 3);
        assert_eq!(a.matched(2, &[1]), 0);
        a.record(1, &[1, 7]); // 1 is fresh again; 2 is now the oldest
        a.record(1, &[8]); // capacity 4: evicts 2
        assert_eq!(a.matched(1, &[1, 2, 3]), 1);
        assert_eq!(a.matched(1, &[7, 8]), 2);
        a.remove_worker(1);
        assert_eq!(a.matched(1, &[1]), 0);
    }
}
