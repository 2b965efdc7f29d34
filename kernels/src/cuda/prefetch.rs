//! Weights pulled into the L2 cache on a side stream while the main stream runs small kernels.
//!
//! A decode step alternates weight products, which stream weights at close to the memory's
//! bandwidth, with stretches of small kernels (norms, RoPE, attention, SiLU) during which the
//! memory bus is nearly idle. [`GpuDevice::prefetch_l2`] forks a side stream at the current
//! point of the main stream and launches `l2_prefetch` (`kernels/cuda/prefetch.cu`) there, so
//! the start of the next product's weights is fetched into L2 while the small kernels run.
//!
//! Invariants:
//! - the side stream only ever reads weights, so nothing on the main stream has to wait for it
//!   for correctness; [`GpuDevice::join_prefetches`] makes the main stream wait for it once at
//!   the end of a step, which a graph capture requires (every forked stream must rejoin) and
//!   which keeps an eager step from leaving work behind;
//! - the fork and join use two events owned here and re-recorded at each use, so neither an
//!   eager step nor a captured one creates driver objects per call;
//! - at most half the L2 cache is prefetched at once, so a prefetch does not evict what the
//!   product running beside it is using.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use half::bf16;

use super::device::GpuDevice;
use super::{CudaError, guard};

/// Bytes per bulk prefetch instruction.
const PIECE_BYTES: usize = 16 << 10;

/// The side stream and its two events.
pub(crate) struct L2Prefetcher {
    side: Arc<CudaStream>,
    /// Recorded on the main stream where a prefetch forks off.
    fork: CudaEvent,
    /// Recorded on the side stream after its last prefetch.
    done: CudaEvent,
    /// Most bytes one prefetch asks for: half the L2 cache.
    budget: usize,
    /// A prefetch was queued since the last join (the main stream must wait on `done`; it only
    /// does so then, since a captured stream may wait only on events recorded in its capture).
    pending: AtomicBool,
}

impl L2Prefetcher {
    /// A side stream beside `main`, prefetching at most half of `l2_bytes` at once.
    pub(crate) fn new(main: &Arc<CudaStream>, l2_bytes: usize) -> Result<Self, CudaError> {
        let ctx = main.context();
        Ok(L2Prefetcher {
            side: ctx.new_stream()?,
            fork: ctx.new_event(None)?,
            done: ctx.new_event(None)?,
            budget: (l2_bytes / 2) & !(PIECE_BYTES - 1),
            pending: AtomicBool::new(false),
        })
    }
}

impl GpuDevice {
    /// Starts fetching the first bytes of `weights` (up to half the L2 cache) into L2 on the side
    /// stream, concurrently with whatever the main stream queues next. A hint only: results never
    /// depend on it. Call [`Self::join_prefetches`] before the end of the step.
    pub fn prefetch_l2(&self, weights: &CudaSlice<bf16>) -> Result<(), CudaError> {
        let p = &self.prefetcher;
        let bytes = (weights.len() * std::mem::size_of::<bf16>()).min(p.budget) & !15;
        if bytes == 0 || p.budget == 0 {
            return Ok(());
        }
        // One warp on each SM (the kernel deals the pieces out block by block), so the bulk
        // prefetches are issued from every SM at once.
        let pieces = bytes.div_ceil(PIECE_BYTES);
        let threads = 32usize;
        let blocks = self.sm_count().min(pieces).max(1);
        let (bytes_i64, piece_i32) = (bytes as i64, PIECE_BYTES as i32);
        guard(|| {
            p.fork.record(self.stream())?;
            p.side.wait(&p.fork)?;
            let mut b = p.side.launch_builder(&self.kernels.l2_prefetch);
            b.arg(weights).arg(&bytes_i64).arg(&piece_i32);
            let cfg = LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (threads as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: `bytes` is within `weights` (a device allocation, 16-byte aligned by the
            // allocator) and a multiple of 16; the kernel only issues prefetches inside it.
            unsafe { b.launch(cfg) }?;
            p.done.record(&p.side)?;
            p.pending.store(true, Ordering::Relaxed);
            Ok(())
        })
    }

    /// Makes the main stream wait for every prefetch queued so far (they finish within a few
    /// microseconds of being issued).
    pub fn join_prefetches(&self) -> Result<(), CudaError> {
        let p = &self.prefetcher;
        if !p.pending.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        guard(|| Ok(self.stream().wait(&p.done)?))
    }
}
