//! The thread pool kernels run on, and the SIMD path they use.
//!
//! A [`CpuPool`] owns a dedicated rayon pool (never the global one, so kernel work does not
//! compete with unrelated rayon users) and an [`Isa`] that the CPU is known to support. Fast
//! kernels take `&CpuPool`, read [`CpuPool::isa`] once per call and run their parallel loops
//! inside [`CpuPool::install`].
//!
//! Cost model: a kernel called from a thread *outside* the pool pays a cross-thread hand-off
//! (about 10 µs on a busy 2-core machine) on every call. A caller that runs many kernels in a
//! row (a forward pass) should wrap the whole sequence in one `pool.install(|| ...)`: kernels
//! called from inside the pool run their parallel loops directly, with no hand-off.

use crate::error::KernelError;
use crate::isa::Isa;

/// A rayon thread pool plus the SIMD path kernels should use on it.
pub struct CpuPool {
    pool: rayon::ThreadPool,
    threads: usize,
    isa: Isa,
}

impl std::fmt::Debug for CpuPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuPool").field("threads", &self.threads).field("isa", &self.isa).finish()
    }
}

impl CpuPool {
    /// A pool of `threads` workers (0 = `std::thread::available_parallelism`) using the best
    /// available ISA.
    pub fn new(threads: usize) -> Result<Self, KernelError> {
        Self::with_isa(threads, Isa::detect())
    }

    /// A pool that forces `isa` (e.g. [`Isa::Scalar`] in tests); fails if the CPU lacks it.
    pub fn with_isa(threads: usize, isa: Isa) -> Result<Self, KernelError> {
        if !isa.is_supported() {
            return Err(KernelError::Pool(format!("ISA {isa} is not supported by this CPU")));
        }
        let threads = if threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .map_err(|e| KernelError::Pool(format!("available_parallelism: {e}")))?
        } else {
            threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("tessera-kernel-{i}"))
            .build()
            .map_err(|e| KernelError::Pool(e.to_string()))?;
        Ok(CpuPool { pool, threads, isa })
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The SIMD path kernels use on this pool.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Runs `f` inside the pool, so rayon parallel iterators in it use the pool's workers.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_and_isa() {
        let pool = CpuPool::with_isa(2, Isa::Scalar).unwrap();
        assert_eq!(pool.threads(), 2);
        assert_eq!(pool.isa(), Isa::Scalar);
        assert_eq!(pool.install(rayon::current_num_threads), 2);
        let auto = CpuPool::new(0).unwrap();
        assert!(auto.threads() >= 1);
        assert_eq!(auto.isa(), Isa::detect());
    }

    #[test]
    fn unsupported_isa_is_an_error() {
        for isa in [Isa::Avx512, Isa::Avx2Fma, Isa::Scalar] {
            let res = CpuPool::with_isa(1, isa);
            assert_eq!(res.is_ok(), isa.is_supported());
        }
    }
}
