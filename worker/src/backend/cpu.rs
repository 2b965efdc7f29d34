//! The CPU backend: f32 compute on a `CpuPool`, weights f32 or bf16, KV in host memory.
//!
//! KV storage per layer is `(num_blocks, n_kv_heads, block_size, head_dim)` f32 for K and the
//! same for V: the layout `tessera_kernels::attention::PagedKvLayer` reads (and whose `offset`
//! the writes use). A `CpuBackend` is
//! also one rank of a tensor-parallel group (`backend::tp`): then it holds that rank's shard,
//! K/V heads and communicator; alone it has a one-rank communicator whose collectives are no-ops.

use std::time::Duration;

use tessera_kernels::attention::PagedKvLayer;
use tessera_kernels::comm::host::{HostComm, host_group};
use tessera_kernels::{CpuPool, HugePageBuf};

use super::{BackendInfo, ModelBackend};
use crate::config::ModelConfig;
use crate::error::EngineError;
use crate::kv_cache::KvCacheConfig;
use crate::model::{LlamaModel, SeqChunk};

/// One layer's K and V, on huge pages: decode reads a block's rows for one head as one 4 KiB-ish
/// run, and on 4 KiB pages nearly every such run would be a TLB miss.
struct LayerKv {
    k: HugePageBuf<f32>,
    v: HugePageBuf<f32>,
}

/// Host-memory K/V for every block of every layer.
pub struct CpuKvStorage {
    layers: Vec<LayerKv>,
    config: KvCacheConfig,
    n_kv_heads: usize,
    head_dim: usize,
}

impl CpuKvStorage {
    /// Allocates (zeroed) storage for every layer of `model`, holding `n_kv_heads` heads per
    /// token (all of the model's, or one rank's share).
    pub fn new(model: &ModelConfig, n_kv_heads: usize, config: KvCacheConfig) -> Result<Self, EngineError> {
        config.validate()?;
        let per_layer = config
            .num_blocks
            .checked_mul(config.block_size)
            .and_then(|x| x.checked_mul(n_kv_heads * model.head_dim))
            .ok_or_else(|| EngineError::InvalidKvConfig(format!("{config:?} overflows")))?;
        let zeros = || HugePageBuf::from_fn(per_layer, |_| 0.0);
        let layers = (0..model.num_layers).map(|_| LayerKv { k: zeros(), v: zeros() }).collect();
        Ok(CpuKvStorage { layers, config, n_kv_heads, head_dim: model.head_dim })
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
        let (n_kv_heads, head_dim) = (self.n_kv_heads, self.head_dim);
        let kv_dim = n_kv_heads * head_dim;
        let config = self.config;
        let Some(l) = self.layers.get_mut(layer) else {
            return Err(EngineError::Internal(format!("KV storage has no layer {layer}")));
        };
        if k.len() != positions.len() * kv_dim || v.len() != k.len() {
            return Err(EngineError::Internal("K/V rows do not match positions".into()));
        }
        let layout = PagedKvLayer { k: &[], v: &[], block_size: config.block_size, n_kv_heads, head_dim };
        for (i, &pos) in positions.iter().enumerate() {
            let slot = config.slot(table, pos as usize)?;
            let (block, in_block) = (slot / config.block_size, slot % config.block_size);
            if block >= config.num_blocks {
                return Err(EngineError::InvalidKvConfig(format!(
                    "block table points past the {} blocks",
                    config.num_blocks
                )));
            }
            for h in 0..n_kv_heads {
                let dst = layout.offset(block, in_block, h);
                let src = i * kv_dim + h * head_dim;
                l.k[dst..dst + head_dim].copy_from_slice(&k[src..src + head_dim]);
                l.v[dst..dst + head_dim].copy_from_slice(&v[src..src + head_dim]);
            }
        }
        Ok(())
    }
}

/// A model (or one rank's shard of it) on the CPU.
pub struct CpuBackend {
    model: LlamaModel,
    pool: CpuPool,
    kv: CpuKvStorage,
    comm: HostComm,
}

impl CpuBackend {
    /// Wraps a whole loaded model, allocating KV storage for `kv_config`.
    pub fn new(model: LlamaModel, pool: CpuPool, kv_config: KvCacheConfig) -> Result<Self, EngineError> {
        // A one-rank group never waits, so its timeout is never used.
        let comm = host_group(1, Duration::MAX, None).remove(0);
        Self::rank(model, pool, kv_config, comm)
    }

    /// One rank of a group: `model` is its shard, `comm` its handle on the group.
    pub fn rank(
        model: LlamaModel,
        pool: CpuPool,
        kv_config: KvCacheConfig,
        comm: HostComm,
    ) -> Result<Self, EngineError> {
        let kv = CpuKvStorage::new(model.config(), model.shard().kv_heads.len(), kv_config)?;
        Ok(CpuBackend { model, pool, kv, comm })
    }

    /// The model (or shard) this backend runs.
    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    /// This rank's handle on its group.
    pub fn comm(&self) -> &HostComm {
        &self.comm
    }

    /// Bytes of K+V this rank stores per token.
    pub fn kv_bytes_per_token(&self) -> usize {
        let heads = self.model.shard().kv_heads.len();
        self.model.config().kv_bytes_per_token_for_heads(heads, super::CPU_KV_ELEM_BYTES) as usize
    }

    /// The thread pool (benchmarks measure bandwidth with it).
    pub fn pool(&self) -> &CpuPool {
        &self.pool
    }
}

impl ModelBackend for CpuBackend {
    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn info(&self) -> BackendInfo {
        BackendInfo {
            device: format!("cpu ({}, {} threads)", self.pool.isa(), self.pool.threads()),
            weights_dtype: self.model.weights_format(),
            weight_bytes_per_step: self.model.weight_bytes_per_token(),
            kv_bytes_per_token: self.kv_bytes_per_token(),
        }
    }

    fn forward(&mut self, chunks: &[SeqChunk<'_>]) -> Result<Vec<f32>, EngineError> {
        // One hand-off to the pool for the whole step: kernels called from inside it run on hot
        // workers instead of paying a cross-thread wake-up each (~10 µs × ~300 calls a step).
        let (model, pool, kv, comm) = (&self.model, &self.pool, &mut self.kv, &self.comm);
        model.forward(pool, comm, kv, chunks)
    }
}
