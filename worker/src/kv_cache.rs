//! KV-cache bookkeeping shared by every backend: fixed-size blocks handed out to sequences.
//!
//! A sequence owns an ordered list of block ids (its block table); position `p` lives in block
//! `table[p / block_size]`, slot `p % block_size`. The storage itself belongs to the backend
//! (host memory for the CPU backend, device memory for CUDA); this module only decides which
//! block holds what, and which full blocks hold a known prefix (the prefix cache). See
//! [`BlockAllocator`] for the invariants.

use std::collections::{BTreeMap, HashMap};

use tessera_proto::{BlockHash, hash_prefix_blocks};

use crate::error::EngineError;
use crate::kv_events::KvEventKind;

/// Capacity of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheConfig {
    /// Number of blocks (shared by all layers: block `b` exists in every layer).
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
}

impl KvCacheConfig {
    /// Enough blocks for `sequences` sequences of up to `max_tokens` tokens each.
    pub fn for_sequences(sequences: usize, max_tokens: usize, block_size: usize) -> Self {
        let per_seq = max_tokens.div_ceil(block_size.max(1));
        KvCacheConfig { num_blocks: sequences.max(1) * per_seq.max(1), block_size }
    }

    /// As many blocks as fit in `bytes` at `bytes_per_token` (K and V of every layer).
    pub fn for_memory(bytes: u64, bytes_per_token: u64, block_size: usize) -> Self {
        let per_block = bytes_per_token.max(1) * block_size.max(1) as u64;
        KvCacheConfig { num_blocks: (bytes / per_block).min(i32::MAX as u64) as usize, block_size }
    }

    /// Rejects empty or oversized caches.
    pub fn validate(&self) -> Result<(), EngineError> {
        if self.block_size == 0 || self.num_blocks == 0 || self.num_blocks > i32::MAX as usize {
            return Err(EngineError::InvalidKvConfig(format!(
                "need a positive block size and 1..=2^31-1 blocks, got {self:?}"
            )));
        }
        Ok(())
    }

    /// The flat slot (`block * block_size + offset`) of position `pos` in a sequence's table.
    pub fn slot(&self, table: &[u32], pos: usize) -> Result<usize, EngineError> {
        let block = table
            .get(pos / self.block_size)
            .ok_or_else(|| EngineError::InvalidKvConfig(format!("position {pos} beyond the block table")))?;
        Ok(*block as usize * self.block_size + pos % self.block_size)
    }
}

/// Hands out blocks and remembers which full blocks hold which prefix.
///
/// Every block is in exactly one state: **free** (no owner, no cached content), **cached**
/// (no owner, holds a registered prefix; evictable, least recently released first) or **in use**
/// (one or more owners; `ref_count > 0`). A cached or in-use block is keyed by the chained hash
/// of the tokens it holds together with all before it (`tessera_proto::hash_prefix_blocks`),
/// and a hash names at most one block. Sequences only ever write positions after their shared
/// prefix, so a shared block is never written while shared.
///
/// Every change to the set of keyed blocks is recorded, in order, as a [`KvEventKind`]
/// (`Stored` when a hash is registered, `Removed` when its block is evicted, `Cleared` when the
/// whole prefix cache is dropped); [`take_events`](Self::take_events) hands them to the event log.
pub struct BlockAllocator {
    config: KvCacheConfig,
    ref_count: Vec<u32>,
    hash_of: Vec<Option<BlockHash>>,
    /// What each keyed block holds: its parent block's hash and its own tokens.
    content: Vec<Option<(Option<BlockHash>, Vec<u32>)>>,
    by_hash: HashMap<BlockHash, u32>,
    free: Vec<u32>,
    /// Cached blocks with no owner, by release tick (oldest first).
    evictable: BTreeMap<u64, u32>,
    released_at: Vec<u64>,
    tick: u64,
    /// Prefix-cache changes not yet taken by the event log.
    events: Vec<KvEventKind>,
}

impl BlockAllocator {
    /// All blocks free.
    pub fn new(config: KvCacheConfig) -> Result<Self, EngineError> {
        config.validate()?;
        let n = config.num_blocks;
        Ok(BlockAllocator {
            config,
            ref_count: vec![0; n],
            hash_of: vec![None; n],
            content: vec![None; n],
            by_hash: HashMap::new(),
            // Pop from the end, so hand out low ids first.
            free: (0..n as u32).rev().collect(),
            evictable: BTreeMap::new(),
            released_at: vec![0; n],
            tick: 0,
            events: Vec::new(),
        })
    }

    /// The capacity.
    pub fn config(&self) -> KvCacheConfig {
        self.config
    }

    /// Blocks that can be handed out now (free plus evictable cached ones).
    pub fn free_blocks(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks holding a registered prefix (in use or not).
    pub fn cached_blocks(&self) -> usize {
        self.by_hash.len()
    }

    /// Cached blocks with no owner (evictable).
    pub fn evictable_blocks(&self) -> usize {
        self.evictable.len()
    }

    /// Blocks owned by at least one sequence.
    pub fn used_blocks(&self) -> usize {
        self.config.num_blocks - self.free_blocks()
    }

    /// Every keyed block as `(hash, parent, tokens)`, in no particular order (for checking the
    /// event stream against the live state).
    pub fn keyed_blocks(&self) -> Vec<(BlockHash, Option<BlockHash>, Vec<u32>)> {
        self.by_hash
            .iter()
            .filter_map(|(&h, &b)| self.content[b as usize].as_ref().map(|(p, t)| (h, *p, t.clone())))
            .collect()
    }

    /// Checks the bookkeeping against `tables` (every live sequence's block table): each block's
    /// reference count equals the number of tables holding it, and every block is in exactly one
    /// of the states free, cached-unowned or in use. For tests and debugging; `Err` names the
    /// first broken rule.
    pub fn check_invariants(&self, tables: &[&[u32]]) -> Result<(), String> {
        let n = self.config.num_blocks;
        let mut refs = vec![0u32; n];
        for table in tables {
            for &b in *table {
                let r = refs.get_mut(b as usize).ok_or_else(|| format!("block {b} out of range"))?;
                *r += 1;
            }
        }
        if refs != self.ref_count {
            return Err("reference counts differ from the tables holding the blocks".into());
        }
        let mut state = vec![0u8; n];
        for &b in &self.free {
            state[b as usize] += 1;
            if self.hash_of[b as usize].is_some() {
                return Err(format!("free block {b} still has a hash"));
            }
        }
        for &b in self.evictable.values() {
            state[b as usize] += 1;
            if self.hash_of[b as usize].is_none() {
                return Err(format!("evictable block {b} has no hash"));
            }
        }
        for (b, &r) in self.ref_count.iter().enumerate() {
            if r > 0 {
                state[b] += 1;
            }
        }
        if let Some(b) = state.iter().position(|&c| c != 1) {
            return Err(format!("block {b} is in {} states (free / cached / in use)", state[b]));
        }
        for (h, &b) in &self.by_hash {
            if self.hash_of[b as usize] != Some(*h) {
                return Err(format!("hash index and block {b} disagree"));
            }
        }
        if self.hash_of.iter().filter(|h| h.is_some()).count() != self.by_hash.len() {
            return Err("a keyed block is missing from the hash index".into());
        }
        Ok(())
    }

    /// The prefix-cache changes since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<KvEventKind> {
        std::mem::take(&mut self.events)
    }

    /// Forgets every registered prefix (after a device failure the stored K/V is suspect):
    /// unowned cached blocks become free, owned ones lose their key.
    pub fn clear_prefix_cache(&mut self) {
        for (_, b) in std::mem::take(&mut self.evictable) {
            self.free.push(b);
        }
        for (h, c) in self.hash_of.iter_mut().zip(self.content.iter_mut()) {
            *h = None;
            *c = None;
        }
        self.by_hash.clear();
        self.events.push(KvEventKind::Cleared);
    }

    /// The longest run of cached blocks that holds a prefix of `tokens`, stopping short of the
    /// last token (whose logits must be computed). Nothing is acquired.
    pub fn lookup_prefix(&self, tokens: &[u32]) -> Vec<u32> {
        let usable = tokens.len().saturating_sub(1);
        let bs = self.config.block_size;
        let mut parent = None;
        let mut hit = Vec::new();
        for (h, chunk) in hash_prefix_blocks(&tokens[..usable], bs).into_iter().zip(tokens.chunks_exact(bs)) {
            let Some(&b) = self.by_hash.get(&h) else { break };
            let verified =
                self.content[b as usize].as_ref().is_some_and(|(p, stored)| *p == parent && stored.as_slice() == chunk);
            if !verified {
                break;
            }
            hit.push(b);
            parent = Some(h);
        }
        hit
    }

    /// Appends `blocks` (from [`lookup_prefix`](Self::lookup_prefix)) to an empty `table`,
    /// taking a reference on each.
    pub fn acquire(&mut self, table: &mut Vec<u32>, blocks: &[u32]) {
        for &b in blocks {
            let i = b as usize;
            if self.ref_count[i] == 0 {
                self.evictable.remove(&self.released_at[i]);
            }
            self.ref_count[i] += 1;
            table.push(b);
        }
    }

    fn take_block(&mut self) -> Option<u32> {
        if let Some(b) = self.free.pop() {
            return Some(b);
        }
        // Evict the least recently released cached block.
        let (_, b) = self.evictable.pop_first()?;
        if let Some(h) = self.hash_of[b as usize].take() {
            self.by_hash.remove(&h);
            self.events.push(KvEventKind::Removed { hash: h });
        }
        self.content[b as usize] = None;
        Some(b)
    }

    /// Grows `table` so that it covers `tokens` positions; all-or-nothing.
    pub fn reserve(&mut self, table: &mut Vec<u32>, tokens: usize) -> Result<(), EngineError> {
        let needed = tokens.div_ceil(self.config.block_size).saturating_sub(table.len());
        if needed > self.free_blocks() {
            return Err(EngineError::KvCacheExhausted { needed, free: self.free_blocks() });
        }
        for _ in 0..needed {
            let b = self.take_block().ok_or(EngineError::KvCacheExhausted { needed, free: 0 })?;
            self.ref_count[b as usize] = 1;
            table.push(b);
        }
        Ok(())
    }

    /// Records that the first `computed` tokens of `tokens` have their K/V in `table`, so the
    /// full blocks among them can serve later prompts with the same prefix.
    pub fn register(&mut self, table: &[u32], tokens: &[u32], computed: usize) {
        let computed = computed.min(tokens.len());
        let bs = self.config.block_size;
        let hashes = hash_prefix_blocks(&tokens[..computed], bs);
        for (k, (&h, &b)) in hashes.iter().zip(table).enumerate() {
            let parent = k.checked_sub(1).map(|p| hashes[p]);
            self.register_block(b, h, parent, &tokens[k * bs..(k + 1) * bs]);
        }
    }

    /// Keys one full, computed block by the chained hash of its content. A block already keyed
    /// keeps its key (a block's content never changes while it is owned), and a hash already
    /// naming another block leaves this one anonymous (freed on release).
    pub fn register_block(&mut self, block: u32, hash: BlockHash, parent: Option<BlockHash>, tokens: &[u32]) {
        let i = block as usize;
        if i >= self.hash_of.len() || self.hash_of[i].is_some() {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.by_hash.entry(hash) {
            e.insert(block);
            self.hash_of[i] = Some(hash);
            self.content[i] = Some((parent, tokens.to_vec()));
            self.events.push(KvEventKind::Stored { hash, parent, tokens: tokens.to_vec() });
        }
    }

    /// Drops a sequence's references and empties its table: blocks holding a registered
    /// prefix stay cached (evictable), the others become free.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        for b in table.drain(..).rev() {
            let i = b as usize;
            self.ref_count[i] = self.ref_count[i].saturating_sub(1);
            if self.ref_count[i] > 0 {
                continue;
            }
            if self.hash_of[i].is_some() {
                self.tick += 1;
                self.released_at[i] = self.tick;
                self.evictable.insert(self.tick, b);
            } else {
                self.free.push(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reserve_is_all_or_nothing() {
        let mut cache = BlockAllocator::new(KvCacheConfig { num_blocks: 3, block_size: 4 }).unwrap();
        let mut a = Vec::new();
        cache.reserve(&mut a, 9).unwrap();
        assert_eq!(a, vec![0, 1, 2]);
        let mut b = Vec::new();
        assert!(matches!(cache.reserve(&mut b, 1), Err(EngineError::KvCacheExhausted { needed: 1, free: 0 })));
        assert!(b.is_empty());
        cache.release(&mut a);
        assert_eq!(cache.free_blocks(), 3);
        cache.reserve(&mut b, 4).unwrap();
        assert_eq!(b.len(), 1);
        assert!(BlockAllocator::new(KvCacheConfig { num_blocks: 0, block_size: 4 }).is_err());
    }

    #[test]
    fn slots_follow_the_table() {
        let c = KvCacheConfig { num_blocks: 8, block_size: 4 };
        assert_eq!(c.slot(&[5, 2], 0).unwrap(), 20);
        assert_eq!(c.slot(&[5, 2], 6).unwrap(), 10);
        assert!(c.slot(&[5, 2], 8).is_err());
    }

    #[test]
    fn prefixes_are_found_shared_and_evicted_lru() {
        let mut m = BlockAllocator::new(KvCacheConfig { num_blocks: 4, block_size: 2 }).unwrap();
        let a: Vec<u32> = vec![1, 2, 3, 4, 5];
        let mut ta = Vec::new();
        m.reserve(&mut ta, a.len()).unwrap();
        m.register(&ta, &a, a.len());
        assert_eq!(m.cached_blocks(), 2); // [1,2] and [3,4]; [5] is partial
        // While `a` runs, a prompt with the same prefix shares its blocks.
        let b: Vec<u32> = vec![1, 2, 3, 4, 9, 9];
        let hit = m.lookup_prefix(&b);
        assert_eq!(hit, ta[..2].to_vec());
        let mut tb = Vec::new();
        m.acquire(&mut tb, &hit);
        m.reserve(&mut tb, b.len()).unwrap();
        assert_eq!(tb.len(), 3);
        // The last token is never served from the cache.
        assert_eq!(m.lookup_prefix(&[1, 2, 3, 4]).len(), 1);
        m.release(&mut ta);
        m.release(&mut tb);
        assert_eq!(m.free_blocks(), 4);
        assert_eq!(m.cached_blocks(), 2);
        // Needing every block evicts the cached ones, least recently released first.
        let mut tc = Vec::new();
        m.reserve(&mut tc, 8).unwrap();
        assert_eq!(m.cached_blocks(), 0);
        assert!(m.lookup_prefix(&a).is_empty());
    }

    #[test]
    fn a_hash_hit_with_other_tokens_is_not_served() {
        let mut m = BlockAllocator::new(KvCacheConfig { num_blocks: 4, block_size: 2 }).unwrap();
        let a: Vec<u32> = vec![1, 2, 3, 4, 5];
        let mut ta = Vec::new();
        m.reserve(&mut ta, a.len()).unwrap();
        m.register(&ta, &a, a.len());
        // Forge a collision: make the first block's stored tokens differ from what its hash says.
        if let Some((_, tokens)) = m.content[ta[0] as usize].as_mut() {
            tokens[0] = 99;
        }
        assert!(m.lookup_prefix(&a).is_empty(), "a block whose tokens differ must not be served");
    }

    proptest! {
        #[test]
        fn blocks_are_conserved_and_prefixes_stay_exact(
            ops in proptest::collection::vec((0usize..4, 1usize..24, 0u8..3, 0u32..3), 1..80)
        ) {
            // Sequences draw tokens from a tiny alphabet so prefixes collide often.
            let mut m = BlockAllocator::new(KvCacheConfig { num_blocks: 12, block_size: 2 }).unwrap();
            let mut seqs: Vec<(Vec<u32>, Vec<u32>)> = vec![(Vec::new(), Vec::new()); 4];
            for (s, len, op, salt) in ops {
                match op {
                    0 => {
                        let (table, _) = &mut seqs[s];
                        m.release(table);
                        seqs[s].1.clear();
                    }
                    _ if seqs[s].0.is_empty() => {
                        let tokens: Vec<u32> = (0..len as u32).map(|i| (i * 7 + salt) % 3).collect();
                        let hit = m.lookup_prefix(&tokens);
                        // Every hit block is keyed by exactly this prefix.
                        let want = tessera_proto::hash_prefix_blocks(&tokens, 2);
                        for (i, &b) in hit.iter().enumerate() {
                            prop_assert_eq!(m.hash_of[b as usize], Some(want[i]));
                        }
                        let mut table = Vec::new();
                        m.acquire(&mut table, &hit);
                        if m.reserve(&mut table, tokens.len()).is_ok() {
                            m.register(&table, &tokens, tokens.len());
                            seqs[s] = (table, tokens);
                        } else {
                            m.release(&mut table);
                        }
                    }
                    _ => {}
                }
                // Conservation: free + evictable + in use = all, and ref counts match the tables.
                let mut refs = vec![0u32; 12];
                for (table, _) in &seqs {
                    for &b in table {
                        refs[b as usize] += 1;
                    }
                }
                prop_assert_eq!(&refs, &m.ref_count);
                let in_use = refs.iter().filter(|&&r| r > 0).count();
                prop_assert_eq!(in_use + m.free_blocks(), 12);
                // A block is never both free and cached; the hash map and per-block keys agree.
                for (h, &b) in &m.by_hash {
                    prop_assert_eq!(m.hash_of[b as usize], Some(*h));
                    prop_assert!(!m.free.contains(&b));
                }
            }
        }
    }
}
