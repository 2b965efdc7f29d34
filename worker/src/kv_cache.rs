//! The paged KV cache: fixed-size blocks of K and V per layer, handed out to sequences.
//!
//! Storage per layer is `(num_blocks, block_size, n_kv_heads, head_dim)` f32 for K and the
//! same for V, the layout `tessera_kernels::attention::PagedKvLayer` reads. A sequence owns an
//! ordered list of block ids (its block table); position `p` lives in block `table[p / bs]`,
//! slot `p % bs`. Invariants: a block id is either in the free list or owned by exactly one
//! table; `free_blocks() + owned == num_blocks`. (Sharing blocks between sequences through the
//! prefix cache comes with the serving engine.)

use tessera_kernels::attention::PagedKvLayer;

use crate::config::ModelConfig;
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
}

struct LayerKv {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// The cache for all layers of one model.
pub struct KvCache {
    layers: Vec<LayerKv>,
    config: KvCacheConfig,
    n_kv_heads: usize,
    head_dim: usize,
    free: Vec<u32>,
}

impl KvCache {
    /// Allocates (zeroed) storage for every layer of `model`.
    pub fn new(model: &ModelConfig, config: KvCacheConfig) -> Result<Self, EngineError> {
        if config.block_size == 0 || config.num_blocks == 0 || config.num_blocks > u32::MAX as usize {
            return Err(EngineError::InvalidKvConfig(format!(
                "need a positive block size and 1..=2^32-1 blocks, got {config:?}"
            )));
        }
        let per_layer = config
            .num_blocks
            .checked_mul(config.block_size)
            .and_then(|x| x.checked_mul(model.kv_dim()))
            .ok_or_else(|| EngineError::InvalidKvConfig(format!("{config:?} overflows")))?;
        let layers =
            (0..model.num_layers).map(|_| LayerKv { k: vec![0.0; per_layer], v: vec![0.0; per_layer] }).collect();
        // Pop from the end, so hand out low ids first.
        let free = (0..config.num_blocks as u32).rev().collect();
        Ok(KvCache { layers, config, n_kv_heads: model.num_kv_heads, head_dim: model.head_dim, free })
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.config.block_size
    }

    /// Blocks not owned by any sequence.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Total blocks.
    pub fn num_blocks(&self) -> usize {
        self.config.num_blocks
    }

    /// Bytes of K and V storage over all layers.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| (l.k.len() + l.v.len()) * 4).sum()
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

    /// A read-only view of one layer for the attention kernel.
    pub fn layer(&self, layer: usize) -> Option<PagedKvLayer<'_>> {
        self.layers.get(layer).map(|l| PagedKvLayer {
            k: &l.k,
            v: &l.v,
            block_size: self.config.block_size,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
        })
    }

    /// Writes K and V rows (`(positions.len(), kv_dim)` each) at `positions` of the sequence
    /// whose blocks are `table`.
    pub fn write(
        &mut self,
        layer: usize,
        table: &[u32],
        positions: &[u32],
        k: &[f32],
        v: &[f32],
    ) -> Result<(), EngineError> {
        let kv_dim = self.n_kv_heads * self.head_dim;
        let bs = self.config.block_size;
        let Some(l) = self.layers.get_mut(layer) else {
            return Err(EngineError::InvalidKvConfig(format!("layer {layer} out of range")));
        };
        if k.len() != positions.len() * kv_dim || v.len() != k.len() {
            return Err(EngineError::InvalidKvConfig("K/V rows do not match positions".into()));
        }
        for (i, &pos) in positions.iter().enumerate() {
            let pos = pos as usize;
            let block = *table
                .get(pos / bs)
                .ok_or_else(|| EngineError::InvalidKvConfig(format!("position {pos} beyond the block table")))?
                as usize;
            let dst = (block * bs + pos % bs) * kv_dim;
            l.k[dst..dst + kv_dim].copy_from_slice(&k[i * kv_dim..(i + 1) * kv_dim]);
            l.v[dst..dst + kv_dim].copy_from_slice(&v[i * kv_dim..(i + 1) * kv_dim]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets;
    use proptest::prelude::*;

    fn tiny() -> ModelConfig {
        presets::find("tiny").unwrap().config
    }

    #[test]
    fn reserve_is_all_or_nothing() {
        let mut cache = KvCache::new(&tiny(), KvCacheConfig { num_blocks: 3, block_size: 4 }).unwrap();
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
    }

    proptest! {
        #[test]
        fn blocks_are_conserved_and_never_shared(ops in proptest::collection::vec((0usize..4, 0usize..40, any::<bool>()), 1..60)) {
            let mut cache = KvCache::new(&tiny(), KvCacheConfig { num_blocks: 16, block_size: 4 }).unwrap();
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
