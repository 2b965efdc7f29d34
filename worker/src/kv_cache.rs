//! KV-cache bookkeeping shared by every backend: fixed-size blocks handed out to sequences.
//!
//! A sequence owns an ordered list of block ids (its block table); position `p` lives in block
//! `table[p / block_size]`, slot `p % block_size`. The storage itself belongs to the backend
//! (host memory for the CPU backend, device memory for CUDA); this module only decides which
//! block holds what. Invariants: a block id is either in the free list or owned by exactly one
//! table; `free_blocks() + owned == num_blocks`. (Sharing blocks between sequences through the
//! prefix cache comes with the serving engine.)

use crate::error::EngineError;

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

/// Hands out blocks.
pub struct BlockAllocator {
    config: KvCacheConfig,
    free: Vec<u32>,
}

impl BlockAllocator {
    /// All blocks free.
    pub fn new(config: KvCacheConfig) -> Result<Self, EngineError> {
        config.validate()?;
        // Pop from the end, so hand out low ids first.
        let free = (0..config.num_blocks as u32).rev().collect();
        Ok(BlockAllocator { config, free })
    }

    /// The capacity.
    pub fn config(&self) -> KvCacheConfig {
        self.config
    }

    /// Blocks not owned by any sequence.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Grows `table` so that it covers `tokens` positions; all-or-nothing.
    pub fn reserve(&mut self, table: &mut Vec<u32>, tokens: usize) -> Result<(), EngineError> {
        let needed = tokens.div_ceil(self.config.block_size).saturating_sub(table.len());
        if needed > self.free.len() {
            return Err(EngineError::KvCacheExhausted { needed, free: self.free.len() });
        }
        let start = self.free.len() - needed;
        table.extend(self.free.drain(start..).rev());
        Ok(())
    }

    /// Returns a sequence's blocks to the free list and empties its table.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        self.free.extend(table.drain(..).rev());
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

    proptest! {
        #[test]
        fn blocks_are_conserved_and_never_shared(ops in proptest::collection::vec((0usize..4, 0usize..40, any::<bool>()), 1..60)) {
            let mut cache = BlockAllocator::new(KvCacheConfig { num_blocks: 16, block_size: 4 }).unwrap();
            let mut tables: Vec<Vec<u32>> = vec![Vec::new(); 4];
            for (seq, tokens, release) in ops {
                if release {
                    cache.release(&mut tables[seq]);
                } else {
                    let before = tables[seq].clone();
                    if cache.reserve(&mut tables[seq], tokens).is_err() {
                        prop_assert_eq!(&tables[seq], &before);
                    }
                }
                let mut owned: Vec<u32> = tables.iter().flatten().copied().collect();
                let n = owned.len();
                owned.sort_unstable();
                owned.dedup();
                prop_assert_eq!(owned.len(), n, "a block is in two tables");
                prop_assert_eq!(n + cache.free_blocks(), 16);
            }
        }
    }
}
