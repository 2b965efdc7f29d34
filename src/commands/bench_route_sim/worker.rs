//! One simulated worker, mirroring the engine's allocator and scheduler: a KV cache of
//! `kv_blocks` blocks keyed by the chained block hashes of `tessera_proto::hash_prefix_blocks`;
//! full computed blocks are keyed (event `Stored`), a finished sequence's keyed blocks become
//! evictable, and taking a block when none is free evicts the least recently released one
//! (`Removed`). A sequence is admitted (FIFO, at most `max_batch` running) only when blocks for
//! its whole prompt and output can be reserved, so it is never preempted. Each step runs every
//! decode plus prefill chunks within `max_batch_tokens`, and lasts
//! `step_base + step_per_seq · decodes + prefill_per_token · prefill tokens`.
//!
//! Invariants: a worker numbers its KV events 1, 2, … without gaps; a referenced block is never
//! evicted, and `free + keyed + anonymous in-use blocks = kv_blocks`, anonymous blocks being
//! exactly those the sequences' tables hold.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::rc::Rc;

use tessera_router::routing::BlockChange;

/// Costs and limits of one simulated worker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct WorkerModel {
    pub(super) kv_blocks: usize,
    pub(super) block_size: usize,
    pub(super) max_batch: usize,
    pub(super) max_batch_tokens: usize,
    pub(super) prefill_us_per_token: f64,
    pub(super) step_base_us: f64,
    pub(super) step_per_seq_us: f64,
}

impl WorkerModel {
    fn step_us(&self, decodes: usize, prefill_tokens: usize) -> u64 {
        let t = self.step_base_us
            + self.step_per_seq_us * decodes as f64
            + self.prefill_us_per_token * prefill_tokens as f64;
        (t.round() as u64).max(1)
    }
}

/// Hashes a key that already is a uniformly distributed hash (a chained block hash) as itself.
#[derive(Debug, Default)]
pub(super) struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used (u64 keys); fold anything else in so it stays a hash.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A block held by a sequence: keyed by its hash (shareable, cached after release) or anonymous
/// (not yet full, or its hash was already keyed by another block; freed on release).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Slot {
    Keyed(u64),
    Anon,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct KeyedBlock {
    refs: u32,
    /// Its key in `evictable` while `refs == 0`.
    released_at: u64,
}

/// A worker's KV cache by block hash, with LRU eviction of unreferenced keyed blocks.
#[derive(Debug)]
pub(super) struct BlockCache {
    capacity: usize,
    /// In-use blocks without a key.
    anon: usize,
    pub(super) keyed: HashMap<u64, KeyedBlock, BuildHasherDefault<PassThrough>>,
    /// Unreferenced keyed blocks by release tick, least recently released first.
    evictable: BTreeMap<u64, u64>,
    tick: u64,
    events: Vec<BlockChange>,
}

impl BlockCache {
    fn new(capacity: usize) -> Self {
        BlockCache {
            capacity,
            anon: 0,
            keyed: HashMap::default(),
            evictable: BTreeMap::new(),
            tick: 0,
            events: Vec::new(),
        }
    }

    /// Blocks neither in use nor cached.
    fn free(&self) -> usize {
        self.capacity.saturating_sub(self.keyed.len() + self.anon)
    }

    /// How many leading blocks of `hashes` are cached.
    fn lookup(&self, hashes: &[u64]) -> usize {
        hashes.iter().take_while(|h| self.keyed.contains_key(h)).count()
    }

    /// Takes a reference on each cached block of `hashes` (from [`lookup`](Self::lookup)).
    fn acquire(&mut self, hashes: &[u64]) {
        for h in hashes {
            if let Some(b) = self.keyed.get_mut(h) {
                if b.refs == 0 {
                    self.evictable.remove(&b.released_at);
                }
                b.refs += 1;
            }
        }
    }

    /// Takes `n` anonymous blocks, evicting the least recently released cached ones when no
    /// block is free; all or nothing.
    fn take(&mut self, n: usize) -> bool {
        if n > self.free() + self.evictable.len() {
            return false;
        }
        for _ in 0..n {
            if self.free() == 0
                && let Some((_, h)) = self.evictable.pop_first()
            {
                self.keyed.remove(&h);
                self.events.push(BlockChange::Removed(h));
            }
            self.anon += 1;
        }
        true
    }

    /// Keys a just-filled anonymous block by `hash`; false (it stays anonymous) when another block
    /// already holds that hash.
    fn register(&mut self, hash: u64) -> bool {
        if self.keyed.contains_key(&hash) {
            return false;
        }
        self.anon = self.anon.saturating_sub(1);
        self.keyed.insert(hash, KeyedBlock { refs: 1, released_at: 0 });
        self.events.push(BlockChange::Stored(hash));
        true
    }

    /// Drops a sequence's blocks, last first (so a prompt's tail is evicted before its head).
    fn release(&mut self, table: &[Slot]) {
        for slot in table.iter().rev() {
            match slot {
                Slot::Anon => self.anon = self.anon.saturating_sub(1),
                Slot::Keyed(h) => {
                    if let Some(b) = self.keyed.get_mut(h) {
                        b.refs = b.refs.saturating_sub(1);
                        if b.refs == 0 {
                            self.tick += 1;
                            b.released_at = self.tick;
                            self.evictable.insert(self.tick, *h);
                        }
                    }
                }
            }
        }
    }

    /// Checks block conservation and reference counts against the tables of the sequences
    /// holding blocks (tests).
    #[cfg(test)]
    pub(super) fn check(&self, tables: &[&[Slot]]) -> Result<(), String> {
        let anon = tables.iter().flat_map(|t| t.iter()).filter(|s| **s == Slot::Anon).count();
        if anon != self.anon || self.keyed.len() + anon > self.capacity {
            return Err(format!(
                "{} keyed + {anon} anonymous blocks held ({} counted), capacity {}",
                self.keyed.len(),
                self.anon,
                self.capacity
            ));
        }
        for (h, b) in &self.keyed {
            let refs = tables.iter().flat_map(|t| t.iter()).filter(|s| **s == Slot::Keyed(*h)).count();
            if refs != b.refs as usize || (refs == 0) != (self.evictable.get(&b.released_at) == Some(h)) {
                return Err(format!("block {h}: {} refs counted, {refs} held, evictable mismatch", b.refs));
            }
        }
        if self.evictable.len() != self.keyed.values().filter(|b| b.refs == 0).count() {
            return Err("evictable blocks that are not keyed".to_string());
        }
        Ok(())
    }
}

/// A request on a worker.
#[derive(Debug)]
pub(super) struct Seq {
    pub(super) request: usize,
    pub(super) conversation: usize,
    pub(super) hashes: Rc<[u64]>,
    pub(super) prompt_len: usize,
    pub(super) output_len: usize,
    /// Tokens whose K/V is in the cache.
    pub(super) computed: usize,
    pub(super) generated: usize,
    pub(super) table: Vec<Slot>,
    /// Blocks below this index have been offered to [`BlockCache::register`].
    pub(super) keyed_upto: usize,
}

/// What a request went through, in simulated microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct RequestRecord {
    pub(super) arrival_us: u64,
    pub(super) first_token_us: Option<u64>,
    pub(super) done_us: Option<u64>,
    pub(super) prompt_tokens: usize,
    pub(super) cached_tokens: Option<usize>,
    pub(super) output_tokens: usize,
}

/// One simulated worker: cache, queue, running batch and the step in progress.
#[derive(Debug)]
pub(super) struct SimWorker {
    model: WorkerModel,
    pub(super) cache: BlockCache,
    pub(super) waiting: VecDeque<Seq>,
    pub(super) running: Vec<Seq>,
    /// `(index in running, tokens)` of the step in progress.
    pub(super) step: Option<Vec<(usize, usize)>>,
    pub(super) published: u64,
}

impl SimWorker {
    pub(super) fn new(model: WorkerModel) -> Self {
        SimWorker {
            model,
            cache: BlockCache::new(model.kv_blocks),
            waiting: VecDeque::new(),
            running: Vec::new(),
            step: None,
            published: 0,
        }
    }

    /// Running tokens (prompt + generated) and waiting tokens, as the engine reports them.
    pub(super) fn load(&self) -> (u64, u64) {
        let running = self.running.iter().map(|s| s.prompt_len + s.generated).sum::<usize>();
        let waiting = self.waiting.iter().map(|s| s.prompt_len).sum::<usize>();
        (running as u64, waiting as u64)
    }

    /// Plans the next step (decodes, then prefill chunks, then admissions) and returns its
    /// duration; `None` when there is nothing to run.
    pub(super) fn start_step(&mut self, records: &mut [RequestRecord]) -> Option<u64> {
        let bs = self.model.block_size;
        let mut budget = self.model.max_batch_tokens;
        let mut chunks = Vec::new();
        let (mut decodes, mut prefill) = (0, 0);
        for (i, _) in self.running.iter().enumerate().filter(|(_, s)| s.computed >= s.prompt_len) {
            chunks.push((i, 1));
            decodes += 1;
            budget = budget.saturating_sub(1);
        }
        for (i, s) in self.running.iter().enumerate().filter(|(_, s)| s.computed < s.prompt_len) {
            let len = (s.prompt_len - s.computed).min(budget);
            if len > 0 {
                chunks.push((i, len));
                prefill += len;
                budget -= len;
            }
        }
        while budget > 0 && self.running.len() < self.model.max_batch {
            let Some(front) = self.waiting.front() else { break };
            // As the engine: the last prompt token is always computed (its logits are needed).
            let usable = (front.prompt_len - 1) / bs;
            let hashes = Rc::clone(&front.hashes);
            let hit = self.cache.lookup(&hashes[..usable]);
            let blocks = (front.prompt_len + front.output_len).div_ceil(bs);
            self.cache.acquire(&hashes[..hit]);
            if !self.cache.take(blocks - hit) {
                let held: Vec<Slot> = hashes[..hit].iter().map(|&h| Slot::Keyed(h)).collect();
                self.cache.release(&held);
                break;
            }
            let Some(mut s) = self.waiting.pop_front() else { break };
            s.table = hashes[..hit].iter().map(|&h| Slot::Keyed(h)).collect();
            s.table.resize(blocks, Slot::Anon);
            s.computed = hit * bs;
            s.keyed_upto = hit;
            if let Some(r) = records.get_mut(s.request) {
                r.cached_tokens = Some(s.computed);
            }
            let len = (s.prompt_len - s.computed).min(budget);
            chunks.push((self.running.len(), len));
            prefill += len;
            budget -= len;
            self.running.push(s);
        }
        if chunks.is_empty() {
            return None;
        }
        self.step = Some(chunks);
        Some(self.model.step_us(decodes, prefill))
    }

    /// Ends the step in progress at `now`: keys newly full blocks, records first tokens and
    /// releases finished sequences. Returns the conversations whose turn finished.
    pub(super) fn finish_step(&mut self, now: u64, records: &mut [RequestRecord]) -> Vec<usize> {
        let bs = self.model.block_size;
        for (i, len) in self.step.take().unwrap_or_default() {
            let Some(s) = self.running.get_mut(i) else { continue };
            let prefilling = s.computed < s.prompt_len;
            s.computed += len;
            let full = s.computed / bs;
            for k in s.keyed_upto..full {
                if self.cache.register(s.hashes[k]) {
                    s.table[k] = Slot::Keyed(s.hashes[k]);
                }
            }
            s.keyed_upto = s.keyed_upto.max(full);
            if !prefilling {
                s.generated += 1;
            } else if s.computed == s.prompt_len {
                s.generated = 1;
                if let Some(r) = records.get_mut(s.request) {
                    r.first_token_us = Some(now);
                }
            }
        }
        let mut finished = Vec::new();
        let cache = &mut self.cache;
        self.running.retain(|s| {
            if s.generated < s.output_len {
                return true;
            }
            cache.release(&s.table);
            if let Some(r) = records.get_mut(s.request) {
                r.done_us = Some(now);
            }
            finished.push(s.conversation);
            false
        });
        finished
    }

    /// The cache changes since the last call, numbered on from the last published event.
    pub(super) fn take_events(&mut self) -> Vec<(u64, BlockChange)> {
        let events = std::mem::take(&mut self.cache.events);
        events
            .into_iter()
            .map(|e| {
                self.published += 1;
                (self.published, e)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use anyhow::Context;
    use tessera_router::routing::{CostWeights, Policy, Router};

    use super::super::tests::model;
    use super::*;

    #[test]
    fn cache_evicts_the_least_recently_released_unreferenced_block() {
        let mut c = BlockCache::new(4);
        assert!(c.take(3));
        assert!(c.register(10) && c.register(11) && !c.register(10), "a hash names one block");
        // Sequence A holds [10, 11, anon]; release keys 10 and 11 as evictable, 11 first (tail first).
        c.release(&[Slot::Keyed(10), Slot::Keyed(11), Slot::Anon]);
        assert_eq!((c.free(), c.evictable.len()), (2, 2));
        assert_eq!(c.lookup(&[10, 11, 12]), 2);
        // B reuses 10 (referenced: not evictable); needing 3 blocks takes 2 free ones and evicts 11.
        c.acquire(&[10]);
        assert!(c.take(3));
        assert!(!c.take(1), "10 is referenced, nothing else is left");
        assert_eq!(c.lookup(&[10, 11]), 1);
        assert_eq!(c.events, [BlockChange::Stored(10), BlockChange::Stored(11), BlockChange::Removed(11)]);
        c.release(&[Slot::Keyed(10), Slot::Anon, Slot::Anon, Slot::Anon]);
        assert_eq!((c.free(), c.evictable.len(), c.keyed.len()), (3, 1, 1));
        // LRU: 20 released after 10, so 10 goes first.
        assert!(c.take(1) && c.register(20));
        c.release(&[Slot::Keyed(20)]);
        assert!(c.take(4));
        assert_eq!(&c.events[3..], [BlockChange::Stored(20), BlockChange::Removed(10), BlockChange::Removed(20)]);
    }

    #[test]
    fn worker_numbers_its_events_without_gaps_and_they_rebuild_the_cache() -> anyhow::Result<()> {
        let mut w = SimWorker::new(model(32));
        let mut index = Router::new(Policy::Kv, CostWeights::default(), 0).index;
        index.reset_worker(0, 0, []);
        let hashes: Rc<[u64]> = (100..120).collect();
        let mut records = vec![RequestRecord {
            arrival_us: 0,
            first_token_us: None,
            done_us: None,
            prompt_tokens: 30,
            cached_tokens: None,
            output_tokens: 5,
        }];
        let seq = |request| Seq {
            request,
            conversation: 0,
            hashes: Rc::clone(&hashes),
            prompt_len: 30,
            output_len: 5,
            computed: 0,
            generated: 0,
            table: Vec::new(),
            keyed_upto: 0,
        };
        w.waiting.push_back(seq(0));
        let mut now = 0;
        let mut numbers = Vec::new();
        while let Some(us) = w.start_step(&mut records) {
            now += us;
            w.finish_step(now, &mut records);
            let tables: Vec<&[Slot]> = w.running.iter().map(|s| s.table.as_slice()).collect();
            w.cache.check(&tables).map_err(anyhow::Error::msg)?;
            for (n, change) in w.take_events() {
                numbers.push(n);
                index.apply(0, n, change)?;
            }
        }
        assert_eq!(numbers, (1..=numbers.len() as u64).collect::<Vec<_>>());
        // 30 prompt + 4 decoded tokens computed: 8 full blocks keyed; nothing evicted.
        assert_eq!(numbers.len(), 8);
        let held = index.blocks_of(0).context("tracked")?;
        assert_eq!(*held, hashes[..8].iter().copied().collect());
        assert_eq!(records[0].cached_tokens, Some(0));
        assert!(records[0].first_token_us.is_some() && records[0].done_us.is_some());
        // The same prompt again hits its first 7 blocks (the last prompt token is recomputed).
        records.push(records[0]);
        w.waiting.push_back(seq(1));
        while let Some(us) = w.start_step(&mut records) {
            now += us;
            w.finish_step(now, &mut records);
        }
        assert_eq!(records[1].cached_tokens, Some(28));
        Ok(())
    }
}
