//! A STREAM-like memory read probe, to compare decode speed against what the machine can do.
//!
//! A [`ReadProbe`] holds a buffer of f32s on huge pages (as model weights are held, see
//! [`crate::hugepage`]), filled once; each [`ReadProbe::pass`] sums the whole buffer, split across
//! the pool's threads in 1 MiB tasks, with SIMD loads, and returns its wall time;
//! [`ReadProbe::report`] times several passes. [`measure_read_bandwidth`] does so on a fresh
//! probe. GB/s uses 1e9 bytes.
//!
//! A probe is kept to be read again and again on the engine's own pool (`tessera bench engine`
//! reads one around every timed run, and optionally between its decode steps).

use std::time::{Duration, Instant};

use crate::hugepage::HugePageBuf;
use crate::isa::Isa;
use crate::pool::CpuPool;
use crate::simd;

/// Result of [`ReadProbe::report`] and [`measure_read_bandwidth`].
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

/// A filled buffer whose passes time how fast the pool's threads read memory.
pub struct ReadProbe {
    buf: HugePageBuf<f32>,
}

impl ReadProbe {
    /// A probe of `bytes` (rounded down to whole f32s), allocated and written once here.
    pub fn new(bytes: usize) -> Self {
        let len = bytes / std::mem::size_of::<f32>();
        ReadProbe { buf: HugePageBuf::from_fn(len, |i| (i % 7) as f32) }
    }

    /// Bytes one pass reads.
    pub fn bytes(&self) -> usize {
        self.buf.len() * std::mem::size_of::<f32>()
    }

    /// `iters` timed passes (at least one) on `pool`: the fastest and the median.
    pub fn report(&self, pool: &CpuPool, iters: usize) -> BandwidthReport {
        let mut rates: Vec<f64> = (0..iters.max(1)).map(|_| gb_per_s(self.bytes(), self.pass(pool))).collect();
        rates.sort_by(f64::total_cmp);
        BandwidthReport {
            bytes: self.bytes(),
            best_gb_per_s: rates.last().copied().unwrap_or(0.0),
            median_gb_per_s: rates[rates.len() / 2],
        }
    }

    /// Reads the whole buffer once on `pool`; returns the wall time.
    pub fn pass(&self, pool: &CpuPool) -> Duration {
        let (isa, len) = (pool.isa(), self.buf.len());
        let chunk = BYTES_PER_TASK / std::mem::size_of::<f32>();
        let mut partial = vec![0.0f32; len.div_ceil(chunk)];
        let start = Instant::now();
        pool.chunks_mut(&mut partial, 1, |c, p| p[0] = sum(isa, &self.buf[c * chunk..((c + 1) * chunk).min(len)]));
        let total: f32 = partial.iter().sum();
        std::hint::black_box(total);
        start.elapsed()
    }
}

/// GB/s (1e9 bytes) of `bytes` read in `time`.
pub fn gb_per_s(bytes: usize, time: Duration) -> f64 {
    bytes as f64 / time.as_secs_f64().max(1e-9) / 1e9
}

/// Measures read bandwidth over a fresh `bytes`-sized buffer, `iters` timed passes (at least
/// one).
pub fn measure_read_bandwidth(pool: &CpuPool, bytes: usize, iters: usize) -> BandwidthReport {
    ReadProbe::new(bytes).report(pool, iters)
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

    #[test]
    fn a_probe_is_reused_across_passes_of_the_size_asked() {
        let pool = CpuPool::new(2).unwrap();
        let probe = ReadProbe::new(3 << 20 | 2);
        assert_eq!(probe.bytes(), 3 << 20);
        for _ in 0..3 {
            let rate = gb_per_s(probe.bytes(), probe.pass(&pool));
            assert!(rate > 0.0 && rate.is_finite(), "{rate}");
        }
        assert_eq!(gb_per_s(2_000_000_000, Duration::from_secs(2)), 1.0);
    }
}
