//! Backends: where the forward pass runs and where KV storage lives.
//!
//! The engine owns scheduling and block bookkeeping (`kv_cache::BlockAllocator`); a backend owns
//! the weights, the KV storage for every block, and the compute. Invariant: a backend writes
//! K/V only at the slots of the block tables it is given, so the engine's allocator is the single
//! authority over which sequence owns which block.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod mock;
pub mod tp;

use std::sync::Arc;

use tessera_kernels::CpuPool;

use crate::config::ModelConfig;
use crate::error::EngineError;
use crate::model::SeqChunk;
use crate::parallel::GroupHealth;
use crate::sampler::DevicePick;

pub use cpu::cpu_kv_elem_bytes;
/// Bytes per K or V element in the CUDA backend's cache (bf16).
pub const CUDA_KV_ELEM_BYTES: usize = 2;

/// What a backend reports about itself (for benchmarks and logs).
#[derive(Debug, Clone)]
pub struct BackendInfo {
    /// "cpu (avx2+fma, 2 threads)", "cuda (NVIDIA H100 80GB HBM3, sm_90)", …
    pub device: String,
    /// How weight matrices are stored ("f32", "bf16", "Q4_1+Q8_0": the formats held, most bytes first).
    pub weights_dtype: String,
    /// Bytes of weights read to decode one step (every matrix once, one embedding row).
    pub weight_bytes_per_step: usize,
    /// Bytes of K+V stored per token (all layers).
    pub kv_bytes_per_token: usize,
    /// What the backend chose by measuring at load, one line each (e.g. which kernel runs each
    /// decode product and the timings behind it); empty when it measured nothing.
    pub tuning: Vec<String>,
}

/// A model ready to run on some device.
pub trait ModelBackend: Send {
    /// The model's shape.
    fn config(&self) -> &ModelConfig;

    /// Describes the device and storage.
    fn info(&self) -> BackendInfo;

    /// Runs `chunks`, storing their K/V at the slots of their block tables, and returns the logits
    /// of each chunk's last token, `(chunks.len(), vocab)`.
    fn forward(&mut self, chunks: &[SeqChunk<'_>]) -> Result<Vec<f32>, EngineError>;

    /// Like [`forward`](Self::forward) but returns only each chunk's token, chosen from its
    /// last position's logits by `picks[i]` exactly as [`DevicePick::apply`] does. Backends
    /// override it to avoid moving logits (a GPU picks the tokens on the device).
    fn forward_pick(&mut self, chunks: &[SeqChunk<'_>], picks: &[DevicePick]) -> Result<Vec<u32>, EngineError> {
        check_picks(chunks, picks)?;
        let vocab = self.config().vocab_size;
        Ok(self.forward(chunks)?.chunks_exact(vocab).zip(picks).map(|(row, pick)| pick.apply(row)).collect())
    }

    /// The thread pool a single-process CPU backend runs every kernel on, for benchmarks that time
    /// memory reads on the same hot threads between steps; `None` elsewhere.
    fn cpu_pool(&self) -> Option<Arc<CpuPool>> {
        None
    }

    /// The health of the tensor-parallel group behind this backend; `None` for a single device,
    /// whose failures are per-step errors rather than the end of the worker.
    fn group_health(&self) -> Option<GroupHealth> {
        None
    }
}

/// One pick per chunk, or an internal error.
pub(crate) fn check_picks(chunks: &[SeqChunk<'_>], picks: &[DevicePick]) -> Result<(), EngineError> {
    if chunks.len() != picks.len() {
        return Err(EngineError::Internal(format!("{} picks for {} chunks", picks.len(), chunks.len())));
    }
    Ok(())
}
