//! The CPU backend: f32 compute on a `CpuPool`, weights in any of the kernels' formats, KV in
//! host memory.
//!
//! KV storage per layer is `(num_blocks, n_kv_heads, block_size, head_dim)` for K and the same
//! for V: the layout `tessera_kernels::attention::PagedKvLayer` reads (and whose `offset` the
//! writes use). Entries are f32 when the weights were asked for in f32 (the exact reference path)
//! and bf16 otherwise ([`cpu_kv_elem_bytes`]): half the memory per token and half the bytes
//! attention reads. A `CpuBackend` is also one rank of a tensor-parallel group (`backend::tp`):
//! then it holds that rank's shard, K/V heads and communicator; alone it has a one-rank
//! communicator whose collectives are no-ops.

use std::sync::Arc;
use std::time::Duration;

use half::bf16;
use tessera_kernels::attention::{AttentionQuery, PagedKvLayer, paged_attention};
use tessera_kernels::comm::host::{HostComm, host_group};
use tessera_kernels::{CpuPool, Elem, HugePageBuf};

use super::{BackendInfo, ModelBackend};
use crate::config::ModelConfig;
use crate::error::EngineError;
use crate::kv_cache::KvCacheConfig;
use crate::model::{LlamaModel, SeqChunk};
use crate::tensor::WeightsDtype;

/// Bytes per K or V entry of the CPU cache for weights loaded as `weights`: f32 (4) for f32
/// weights, bf16 (2) for every other choice.
pub fn cpu_kv_elem_bytes(weights: WeightsDtype) -> usize {
    match weights {
        WeightsDtype::F32 => 4,
        WeightsDtype::Bf16 | WeightsDtype::Q8_0 | WeightsDtype::Keep => 2,
    }
}

/// One layer's K and V, on huge pages: decode reads a block's rows for one head as one
/// contiguous run, and on 4 KiB pages nearly every such run would be a TLB miss.
struct LayerKv<E: Copy> {
    k: HugePageBuf<E>,
    v: HugePageBuf<E>,
}

/// Every layer's K/V with entries of type `E`.
struct Layers<E: Copy>(Vec<LayerKv<E>>);

impl<E: Elem> Layers<E> {
    fn zeroed(layers: usize, per_layer: usize, zero: E) -> Self {
        let zeros = || HugePageBuf::from_fn(per_layer, |_| zero);
        Layers((0..layers).map(|_| LayerKv { k: zeros(), v: zeros() }).collect())
    }

    /// Copies K and V rows (converted by `to_e`) into the rows `layout` gives for `slots`.
    fn write(
        &mut self,
        layer: usize,
        layout: &PagedKvLayer<'_, E>,
        slots: &[(usize, usize)],
        k: &[f32],
        v: &[f32],
        to_e: impl Fn(f32) -> E,
    ) -> Result<(), EngineError> {
        let Some(l) = self.0.get_mut(layer) else {
            return Err(EngineError::Internal(format!("KV storage has no layer {layer}")));
        };
        let hd = layout.head_dim;
        let kv_dim = layout.n_kv_heads * hd;
        for (i, &(block, slot)) in slots.iter().enumerate() {
            for h in 0..layout.n_kv_heads {
                let dst = layout.offset(block, slot, h);
                let src = i * kv_dim + h * hd;
                for (d, s) in l.k[dst..dst + hd].iter_mut().zip(&k[src..src + hd]) {
                    *d = to_e(*s);
                }
                for (d, s) in l.v[dst..dst + hd].iter_mut().zip(&v[src..src + hd]) {
                    *d = to_e(*s);
                }
            }
        }
        Ok(())
    }

    fn view<'a>(&'a self, layer: usize, shape: &PagedKvLayer<'_, E>) -> Option<PagedKvLayer<'a, E>> {
        self.0.get(layer).map(|l| PagedKvLayer {
            k: &l.k,
            v: &l.v,
            block_size: shape.block_size,
            n_kv_heads: shape.n_kv_heads,
            head_dim: shape.head_dim,
        })
    }
}

/// The cache's entries, in the element type chosen at allocation.
enum Entries {
    F32(Layers<f32>),
    Bf16(Layers<bf16>),
}

/// Host-memory K/V for every block of every layer.
pub struct CpuKvStorage {
    entries: Entries,
    config: KvCacheConfig,
    n_kv_heads: usize,
    head_dim: usize,
}

impl CpuKvStorage {
    /// Allocates (zeroed) storage for every layer of `model`, holding `n_kv_heads` heads per
    /// token (all of the model's, or one rank's share), with `elem_bytes` (4: f32, 2: bf16) per
    /// entry.
    pub fn new(
        model: &ModelConfig,
        n_kv_heads: usize,
        config: KvCacheConfig,
        elem_bytes: usize,
    ) -> Result<Self, EngineError> {
        config.validate()?;
        let per_layer = config
            .num_blocks
            .checked_mul(config.block_size)
            .and_then(|x| x.checked_mul(n_kv_heads * model.head_dim))
            .ok_or_else(|| EngineError::InvalidKvConfig(format!("{config:?} overflows")))?;
        let entries = match elem_bytes {
            4 => Entries::F32(Layers::zeroed(model.num_layers, per_layer, 0.0)),
            2 => Entries::Bf16(Layers::zeroed(model.num_layers, per_layer, bf16::ZERO)),
            other => return Err(EngineError::Internal(format!("no {other}-byte KV entries on the CPU"))),
        };
        Ok(CpuKvStorage { entries, config, n_kv_heads, head_dim: model.head_dim })
    }

    /// Bytes per K or V entry.
    pub fn elem_bytes(&self) -> usize {
        match self.entries {
            Entries::F32(_) => 4,
            Entries::Bf16(_) => 2,
        }
    }

    /// The geometry of every layer (no data).
    fn shape<E>(&self) -> PagedKvLayer<'static, E> {
        PagedKvLayer {
            k: &[],
            v: &[],
            block_size: self.config.block_size,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
        }
    }

    /// Attention of the query rows `q` over layer `layer` (see
    /// `tessera_kernels::attention::paged_attention`).
    pub fn attention(
        &self,
        pool: &CpuPool,
        layer: usize,
        q: &[f32],
        queries: &[AttentionQuery],
        n_heads: usize,
        out: &mut [f32],
    ) -> Result<(), EngineError> {
        let missing = || EngineError::Internal(format!("KV storage has no layer {layer}"));
        match &self.entries {
            Entries::F32(l) => {
                paged_attention(pool, q, queries, &l.view(layer, &self.shape()).ok_or_else(missing)?, n_heads, out)?
            }
            Entries::Bf16(l) => {
                paged_attention(pool, q, queries, &l.view(layer, &self.shape()).ok_or_else(missing)?, n_heads, out)?
            }
        }
        Ok(())
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
        let config = self.config;
        if k.len() != positions.len() * kv_dim || v.len() != k.len() {
            return Err(EngineError::Internal("K/V rows do not match positions".into()));
        }
        let mut slots = Vec::with_capacity(positions.len());
        for &pos in positions {
            let slot = config.slot(table, pos as usize)?;
            let (block, in_block) = (slot / config.block_size, slot % config.block_size);
            if block >= config.num_blocks {
                return Err(EngineError::InvalidKvConfig(format!(
                    "block table points past the {} blocks",
                    config.num_blocks
                )));
            }
            slots.push((block, in_block));
        }
        let (f32_shape, bf16_shape) = (self.shape(), self.shape());
        match &mut self.entries {
            Entries::F32(l) => l.write(layer, &f32_shape, &slots, k, v, |x| x),
            Entries::Bf16(l) => l.write(layer, &bf16_shape, &slots, k, v, bf16::from_f32),
        }
    }
}

/// A model (or one rank's shard of it) on the CPU.
pub struct CpuBackend {
    model: LlamaModel,
    /// Shared only with benchmarks, which time memory reads on the same hot threads.
    pool: Arc<CpuPool>,
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

    /// [`CpuBackend::new`] with `kv_elem_bytes` (4: f32, 2: bf16) per KV entry instead of the
    /// weights' default ([`cpu_kv_elem_bytes`]): for checking the kernels on an f32 cache.
    pub fn with_kv_elem_bytes(
        mut model: LlamaModel,
        pool: CpuPool,
        kv_config: KvCacheConfig,
        kv_elem_bytes: usize,
    ) -> Result<Self, EngineError> {
        model.lay_out_for(&pool);
        let comm = host_group(1, Duration::MAX, None).remove(0);
        let kv = CpuKvStorage::new(model.config(), model.shard().kv_heads.len(), kv_config, kv_elem_bytes)?;
        Ok(CpuBackend { model, pool: Arc::new(pool), kv, comm })
    }

    /// One rank of a group: `model` is its shard, `comm` its handle on the group. The model's
    /// matrices are laid out as `pool`'s kernels read them fastest ([`LlamaModel::lay_out_for`]).
    pub fn rank(
        mut model: LlamaModel,
        pool: CpuPool,
        kv_config: KvCacheConfig,
        comm: HostComm,
    ) -> Result<Self, EngineError> {
        model.lay_out_for(&pool);
        let elem_bytes = cpu_kv_elem_bytes(model.weights_dtype());
        let kv = CpuKvStorage::new(model.config(), model.shard().kv_heads.len(), kv_config, elem_bytes)?;
        Ok(CpuBackend { model, pool: Arc::new(pool), kv, comm })
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
        self.model.config().kv_bytes_per_token_for_heads(heads, self.kv.elem_bytes()) as usize
    }
}

impl ModelBackend for CpuBackend {
    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn cpu_pool(&self) -> Option<Arc<CpuPool>> {
        Some(Arc::clone(&self.pool))
    }

    fn info(&self) -> BackendInfo {
        BackendInfo {
            device: format!("cpu ({}, {} threads)", self.pool.isa(), self.pool.threads()),
            weights_dtype: self.model.weights_format(),
            weight_bytes_per_step: self.model.weight_bytes_per_token(),
            kv_bytes_per_token: self.kv_bytes_per_token(),
            tuning: Vec::new(),
        }
    }

    fn forward(&mut self, chunks: &[SeqChunk<'_>]) -> Result<Vec<f32>, EngineError> {
        // One hand-off to the pool for the whole step: kernels called from inside it run on hot
        // workers instead of paying a cross-thread wake-up each (~10 µs × ~300 calls a step).
        let (model, pool, kv, comm) = (&self.model, &self.pool, &mut self.kv, &self.comm);
        model.forward(pool, comm, kv, chunks)
    }
}
