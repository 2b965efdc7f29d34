//! Compute-rate probes: the f32 fused-multiply-add rate the pool's threads reach on register
//! data, and on CPUs with AVX-512 VNNI the 16-bit integer dot-product rate (what matmuls against
//! Q8_0 weights in row panels run on), to compare matmul speed against what the machine can do.
//!
//! [`measure_fma_peak`] runs, on every pool thread at once, a loop of independent FMA chains
//! (enough of them to cover the FMA latency on current x86 cores) that never touches memory, and
//! counts 2 FLOPs per lane per FMA. On the AVX2 and AVX-512 paths the vectors are 8 lanes wide
//! (AVX-512 cores of the Zen 4 kind split 16-lane FMAs in two, so 8-lane chains already reach
//! the peak there); the scalar path measures scalar `mul_add` chains.

use std::time::Instant;

use crate::isa::Isa;
use crate::pool::CpuPool;

/// Result of [`measure_fma_peak`].
#[derive(Clone, Copy, Debug)]
pub struct PeakReport {
    /// Fastest pass, all threads together.
    pub best_gflop_per_s: f64,
    /// Median pass.
    pub median_gflop_per_s: f64,
}

/// Independent accumulator chains per thread.
const CHAINS: usize = 12;
/// FMA rounds per chain per pass and thread.
const ROUNDS: usize = 2_000_000;

/// Measures the f32 FMA rate of all of `pool`'s threads together, `iters` timed passes.
pub fn measure_fma_peak(pool: &CpuPool, iters: usize) -> PeakReport {
    let isa = pool.isa();
    let mut widths = vec![if isa.has_avx2() { 8 } else { 1 }];
    if isa.has_avx2() && Isa::Avx512.is_supported() {
        widths.push(16);
    }
    let threads = pool.threads();
    widths
        .into_iter()
        .map(|lanes| {
            let flops = (threads * CHAINS * ROUNDS * lanes * 2) as f64;
            timed_passes(pool, iters, flops, || chains(isa, lanes))
        })
        .fold(PeakReport { best_gflop_per_s: 0.0, median_gflop_per_s: 0.0 }, |a, b| {
            if b.best_gflop_per_s > a.best_gflop_per_s { b } else { a }
        })
}

/// Times `iters` passes (at least one) of `pass` run on every thread of `pool` at once, each pass
/// doing `ops` operations in all; the result of each thread's pass is kept from being optimised
/// away.
fn timed_passes(pool: &CpuPool, iters: usize, ops: f64, pass: impl Fn() -> f32 + Sync) -> PeakReport {
    let mut rates: Vec<f64> = (0..iters.max(1))
        .map(|_| {
            let start = Instant::now();
            let mut partial = vec![0.0f32; pool.threads()];
            pool.chunks_mut(&mut partial, 1, |_, p| p[0] = pass());
            let total: f32 = partial.iter().sum();
            std::hint::black_box(total);
            ops / start.elapsed().as_secs_f64().max(1e-9) / 1e9
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    PeakReport { best_gflop_per_s: rates[rates.len() - 1], median_gflop_per_s: rates[rates.len() / 2] }
}

/// Measures the 16-bit integer dot-product rate (`vpdpwssd` on 512-bit vectors: 32 multiply-adds
/// each, counted as 2 operations apiece like FMAs) of all of `pool`'s threads together, `iters`
/// timed passes; `None` unless the pool's ISA has VNNI ([`Isa::has_vnni`]).
pub fn measure_int16_dot_peak(pool: &CpuPool, iters: usize) -> Option<PeakReport> {
    if !pool.isa().has_vnni() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let ops = (pool.threads() * CHAINS * ROUNDS * 32 * 2) as f64;
        // SAFETY: the pool's ISA is supported, and it includes AVX-512F and VNNI.
        Some(timed_passes(pool, iters, ops, || unsafe { int16_dot_chains() } as f32))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = iters;
        None
    }
}

/// One thread's chains of `vpdpwssd`, in assembly: LLVM may otherwise split each into
/// `vpmaddwd` and `vpaddd`, which would time something else.
///
/// # Safety
/// The CPU must have AVX-512F and VNNI.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn int16_dot_chains() -> i32 {
    use std::arch::x86_64::*;
    let a = _mm512_set1_epi16(std::hint::black_box(3));
    let b = _mm512_set1_epi16(std::hint::black_box(-2));
    let mut acc = [_mm512_setzero_si512(); CHAINS];
    for _ in 0..ROUNDS {
        for v in acc.iter_mut() {
            // SAFETY: register operands only; the caller guarantees the features.
            unsafe {
                std::arch::asm!(
                    "vpdpwssd {acc}, {a}, {b}",
                    acc = inout(zmm_reg) *v,
                    a = in(zmm_reg) a,
                    b = in(zmm_reg) b,
                    options(pure, nomem, nostack, preserves_flags),
                );
            }
        }
    }
    _mm512_reduce_add_epi32(acc.iter().fold(_mm512_setzero_si512(), |s, v| _mm512_add_epi32(s, *v)))
}

/// One thread's chains, `lanes` wide (8 or 16 on x86 SIMD paths, else scalar).
fn chains(isa: Isa, lanes: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: pools hold only supported ISAs, every x86 SIMD ISA includes AVX2+FMA, and 16
        // lanes are asked for only when the CPU has AVX-512 too.
        return unsafe { if lanes == 16 { chains_avx512() } else { chains_avx2() } };
    }
    let _ = (isa, lanes);
    let mut acc = [0.0f32; CHAINS];
    let (a, b) = (std::hint::black_box(0.999_f32), std::hint::black_box(1e-3_f32));
    for _ in 0..ROUNDS {
        for v in acc.iter_mut() {
            *v = v.mul_add(a, b);
        }
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn chains_avx2() -> f32 {
    use std::arch::x86_64::*;
    let a = _mm256_set1_ps(std::hint::black_box(0.999));
    let b = _mm256_set1_ps(std::hint::black_box(1e-3));
    let mut acc = [_mm256_setzero_ps(); CHAINS];
    for _ in 0..ROUNDS {
        for v in acc.iter_mut() {
            *v = _mm256_fmadd_ps(*v, a, b);
        }
    }
    let mut out = [0.0f32; 8];
    let total = acc.iter().fold(_mm256_setzero_ps(), |s, v| _mm256_add_ps(s, *v));
    // SAFETY: `out` holds 8 f32s.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), total) };
    out.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn chains_avx512() -> f32 {
    use std::arch::x86_64::*;
    let a = _mm512_set1_ps(std::hint::black_box(0.999));
    let b = _mm512_set1_ps(std::hint::black_box(1e-3));
    let mut acc = [_mm512_setzero_ps(); CHAINS];
    for _ in 0..ROUNDS {
        for v in acc.iter_mut() {
            *v = _mm512_fmadd_ps(*v, a, b);
        }
    }
    _mm512_reduce_add_ps(acc.iter().fold(_mm512_setzero_ps(), |s, v| _mm512_add_ps(s, *v)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_positive_rates() {
        for isa in Isa::available() {
            let pool = CpuPool::with_isa(1, isa).unwrap();
            let r = measure_fma_peak(&pool, 1);
            assert!(r.best_gflop_per_s > 0.0 && r.best_gflop_per_s.is_finite());
            assert!(r.median_gflop_per_s <= r.best_gflop_per_s);
            let dot = measure_int16_dot_peak(&pool, 1);
            assert_eq!(dot.is_some(), isa.has_vnni());
            if let Some(d) = dot {
                assert!(d.best_gflop_per_s > 0.0 && d.best_gflop_per_s.is_finite());
            }
        }
    }
}
