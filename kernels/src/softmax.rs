//! Numerically stable softmax over one row, in place.
//!
//! `x[i] <- e^(x[i] - max) / Σ_j e^(x[j] - max)`. The row must hold at least one finite value
//! for a meaningful result; an empty row is left as is. [`softmax_ref`] uses `f32::exp` and
//! divides; the fast variant uses a polynomial `exp` on AVX2 and multiplies by the reciprocal,
//! so the two agree to a few ulp. [`exp_shifted_isa`] is the fast variant without the division,
//! for callers that combine several rows' statistics (chunked attention).

use crate::isa::Isa;

/// Reference softmax (sequential sums, `f32::exp`).
pub fn softmax_ref(x: &mut [f32]) {
    if x.is_empty() {
        return;
    }
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// Fast softmax using the best ISA of the running CPU.
pub fn softmax(x: &mut [f32]) {
    softmax_isa(Isa::detect(), x);
}

/// Fast softmax on a chosen ISA; an ISA the CPU lacks falls back to the scalar path.
pub fn softmax_isa(isa: Isa, x: &mut [f32]) {
    if x.is_empty() {
        return;
    }
    let (_, sum) = exp_shifted_isa(isa, x);
    let inv = 1.0 / sum;
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() && isa.is_supported() {
        // SAFETY: AVX2 support was just checked.
        unsafe { scale_avx2(x, inv) };
        return;
    }
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `x[i] <- e^(x[i] - max)` with the fast `exp`; returns `(max, Σ_i x[i])` (`(-∞, 0)` for an
/// empty row). [`softmax_isa`] is this followed by a multiply by `1 / sum`.
pub fn exp_shifted_isa(isa: Isa, x: &mut [f32]) -> (f32, f32) {
    if x.is_empty() {
        return (f32::NEG_INFINITY, 0.0);
    }
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() && isa.is_supported() {
        // SAFETY: AVX2 and FMA support was just checked.
        return unsafe { exp_shifted_avx2(x) };
    }
    let _ = isa;
    exp_shifted_scalar(x)
}

fn exp_shifted_scalar(x: &mut [f32]) -> (f32, f32) {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (m, v) in lanes.iter_mut().zip(c) {
            *m = m.max(*v);
        }
    }
    let max = chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    (max, sum)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_shifted_avx2(x: &mut [f32]) -> (f32, f32) {
    use crate::simd::avx2::{exp, hmax, hsum, load, store};
    use std::arch::x86_64::*;
    let n = x.len();
    let body = n - n % 8;
    let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i < body {
        // SAFETY: `i + 8 <= body <= n`.
        vmax = _mm256_max_ps(vmax, unsafe { load(x, i) });
        i += 8;
    }
    let max = x[body..].iter().fold(hmax(vmax), |m, &v| m.max(v));
    let vm = _mm256_set1_ps(max);
    let mut vsum = _mm256_setzero_ps();
    i = 0;
    while i < body {
        // SAFETY: `i + 8 <= body <= n`.
        unsafe {
            let e = exp(_mm256_sub_ps(load(x, i), vm));
            store(x, i, e);
            vsum = _mm256_add_ps(vsum, e);
        }
        i += 8;
    }
    // Tail through a padded register so every element uses the same `exp`.
    let mut pad = [max; 8];
    let rest = n - body;
    pad[..rest].copy_from_slice(&x[body..]);
    // SAFETY: `pad` holds 8 floats.
    unsafe {
        let e = exp(_mm256_sub_ps(load(&pad, 0), vm));
        store(&mut pad, 0, e);
    }
    x[body..].copy_from_slice(&pad[..rest]);
    (max, hsum(vsum) + pad[..rest].iter().sum::<f32>())
}

/// `x[i] *= inv`, eight lanes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn scale_avx2(x: &mut [f32], inv: f32) {
    use crate::simd::avx2::{load, store};
    use std::arch::x86_64::*;
    let body = x.len() - x.len() % 8;
    let vinv = _mm256_set1_ps(inv);
    let mut i = 0;
    while i < body {
        // SAFETY: `i + 8 <= body <= len`.
        unsafe { store(x, i, _mm256_mul_ps(load(x, i), vinv)) };
        i += 8;
    }
    for v in &mut x[body..] {
        *v *= inv;
    }
}
