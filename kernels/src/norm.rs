//! RMSNorm, in Hugging Face Llama order: `out = (x * (1 / sqrt(mean(x²) + eps))) * weight`.
//!
//! `x` and `out` are `(tokens, d)` row-major with `d = weight.len() > 0`; rows are independent.
//! The reference sums squares sequentially; the fast kernel sums them in SIMD lanes, so the two
//! agree to f32 rounding. Multiplication order is the same in both.

use crate::error::{KernelError, check_len};
use crate::isa::Isa;
use crate::pool::CpuPool;
use crate::profile::{self, KernelClass};
use crate::simd;

/// Elements per parallel task (rounded to whole rows).
const ELEMS_PER_TASK: usize = 16 * 1024;

fn check(kernel: &'static str, x: &[f32], weight: &[f32], out: &[f32]) -> Result<(), KernelError> {
    let d = weight.len();
    if d == 0 {
        return Err(KernelError::shape(kernel, "weight is empty"));
    }
    if !x.len().is_multiple_of(d) {
        return Err(KernelError::shape(
            kernel,
            format!("x has length {}, not a multiple of the row length {d}", x.len()),
        ));
    }
    check_len(kernel, "out", out.len(), x.len())
}

/// Reference RMSNorm over each row of `x` (row length `weight.len()`).
pub fn rms_norm_ref(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<(), KernelError> {
    check("rms_norm_ref", x, weight, out)?;
    let d = weight.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mut ss = 0.0f32;
        for v in xr {
            ss += v * v;
        }
        let inv = 1.0 / (ss / d as f32 + eps).sqrt();
        for ((o, xv), wv) in or.iter_mut().zip(xr).zip(weight) {
            *o = (xv * inv) * wv;
        }
    }
    Ok(())
}

/// Fast RMSNorm: rows in parallel on `pool`, SIMD within a row.
pub fn rms_norm(pool: &CpuPool, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<(), KernelError> {
    check("rms_norm", x, weight, out)?;
    let _timed = profile::scope(KernelClass::RmsNorm, 4 * (x.len() + out.len() + weight.len()), 3 * x.len());
    let d = weight.len();
    let chunk = (ELEMS_PER_TASK / d).max(1) * d;
    let isa = pool.isa();
    pool.chunks_mut(out, chunk, |i, oc| {
        let xc = &x[i * chunk..i * chunk + oc.len()];
        for (or, xr) in oc.chunks_exact_mut(d).zip(xc.chunks_exact(d)) {
            row(isa, xr, weight, eps, or);
        }
    });
    Ok(())
}

fn row(isa: Isa, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: pools hold only supported ISAs, and every x86 SIMD ISA includes AVX2.
        unsafe { avx2_row(x, weight, eps, out) };
        return;
    }
    let _ = isa;
    let inv = 1.0 / (simd::sum_sq(x) / x.len() as f32 + eps).sqrt();
    for ((o, xv), wv) in out.iter_mut().zip(x).zip(weight) {
        *o = (xv * inv) * wv;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn avx2_row(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    use crate::simd::avx2::{load, store, sum_sq};
    use std::arch::x86_64::*;
    let n = x.len().min(weight.len()).min(out.len());
    let inv = 1.0 / (sum_sq(x) / x.len() as f32 + eps).sqrt();
    let vinv = _mm256_set1_ps(inv);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: `i + 8 <= n`, which bounds all three slices.
        unsafe {
            let v = _mm256_mul_ps(_mm256_mul_ps(load(x, i), vinv), load(weight, i));
            store(out, i, v);
        }
        i += 8;
    }
    for ((o, xv), wv) in out[i..n].iter_mut().zip(&x[i..n]).zip(&weight[i..n]) {
        *o = (xv * inv) * wv;
    }
}
