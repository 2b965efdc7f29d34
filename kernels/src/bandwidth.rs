//! A STREAM-like memory read probe, to compare decode speed against what the machine can do.
//!
//! [`measure_read_bandwidth`] allocates a buffer of f32s on huge pages (as model weights are held,
//! see [`crate::hugepage`]), fills it, then times `iters` passes that each sum the whole buffer,
//! split across the pool's threads in 1 MiB tasks, with SIMD loads. GB/s uses 1e9 bytes.

use std::time::Instant;

use crate::hugepage::HugePageBuf;
use crate::isa::Isa;
use crate::pool::CpuPool;
use crate::simd;

/// Result of [`measure_read_bandwidth`].
#[derive(Clone, Copy, Debug)]
pub struct BandwidthReport {
    /// Bytes read per pass (the requested size rounded down to whole f32s).
    pub bytes: usize,
    /// Fastest pass.
    pub best_gb_per_s: f64,
    /// Median pass.
    pub median_gb_per_s: f64,
}

/// Bytes per parallel task of one pass.
const BYTES_PER_TASK: usize = 1 << 20;

/// Measures read bandwidth over a `bytes`-sized buffer, `iters` timed passes (at least one).
pub fn measure_read_bandwidth(pool: &CpuPool, bytes: usize, iters: usize) -> BandwidthReport {
    let len = bytes / std::mem::size_of::<f32>();
    let chunk = BYTES_PER_TASK / std::mem::size_of::<f32>();
    let isa = pool.isa();
    // The same page size the weights live on (see `crate::hugepage`).
    let buf = HugePageBuf::from_fn(len, |i| (i % 7) as f32);
    let mut rates: Vec<f64> = (0..iters.max(1))
        .map(|_| {
            let start = Instant::now();
            let mut partial = vec![0.0f32; len.div_ceil(chunk)];
            pool.chunks_mut(&mut partial, 1, |c, p| p[0] = sum(isa, &buf[c * chunk..((c + 1) * chunk).min(len)]));
            let total: f32 = partial.iter().sum();
            std::hint::black_box(total);
            let secs = start.elapsed().as_secs_f64().max(1e-9);
            (len * std::mem::size_of::<f32>()) as f64 / secs / 1e9
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    BandwidthReport {
        bytes: len * std::mem::size_of::<f32>(),
        best_gb_per_s: rates.last().copied().unwrap_or(0.0),
        median_gb_per_s: rates[rates.len() / 2],
    }
}

fn sum(isa: Isa, s: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: pools hold only supported ISAs, and every x86 SIMD ISA includes AVX2.
        return unsafe { simd::avx2::sum(s) };
    }
    let _ = isa;
    simd::sum(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_positive_rates() {
        for isa in Isa::available() {
            let pool = CpuPool::with_isa(2, isa).unwrap();
            let r = measure_read_bandwidth(&pool, (1 << 20) + 6, 3);
            assert_eq!(r.bytes, (1 << 20) + 4);
            assert!(r.best_gb_per_s > 0.0 && r.best_gb_per_s.is_finite());
            assert!(r.median_gb_per_s > 0.0 && r.median_gb_per_s <= r.best_gb_per_s);
        }
        let pool = CpuPool::with_isa(1, Isa::Scalar).unwrap();
        let r = measure_read_bandwidth(&pool, 0, 0);
        assert_eq!(r.bytes, 0);
    }
}
