//! AVX2 register-widening dot products for the block formats ([`Kernel`] implementations).
//!
//! Per block: the 32 quantised values become four 8-lane f32 vectors (sign- or zero-extended
//! bytes, converted), the block's f16 scale (and minimum) is widened with F16C, and for each
//! token row `t = Σ q·x` over the block is folded in as `acc += d · t` (plus `m · Σ x` for Q4_1,
//! whose values are `q·d + m`). Q4_0's offset of 8 is subtracted from the bytes before widening.
//! Sums are in a different order from the reference, so results agree to f32 rounding.

use std::arch::x86_64::*;

use super::quantized::Kernel;
use crate::quant::{BlockQ4_0, BlockQ4_1, BlockQ8_0, QK};
use crate::simd::avx2::hsum;

/// An f16 widened and broadcast to 8 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn splat_f16(h: half::f16) -> __m256 {
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h.to_bits())));
    _mm256_broadcastss_ps(v)
}

/// Four vectors of signed bytes → f32: `lo` holds values 0..16, `hi` values 16..32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn widen_i8(lo: __m128i, hi: __m128i) -> [__m256; 4] {
    let cvt = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
    [cvt(lo), cvt(_mm_unpackhi_epi64(lo, lo)), cvt(hi), cvt(_mm_unpackhi_epi64(hi, hi))]
}

/// Low and high nibbles of the 16 bytes at `p`: values 0..16 and 16..32 of a Q4 block.
///
/// # Safety
/// `p` must be readable for 16 bytes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn nibbles(p: *const u8) -> (__m128i, __m128i) {
    // SAFETY: the caller guarantees 16 readable bytes; `loadu` has no alignment requirement.
    let raw = unsafe { _mm_loadu_si128(p.cast()) };
    let mask = _mm_set1_epi8(0x0F);
    (_mm_and_si128(raw, mask), _mm_and_si128(_mm_srli_epi16::<4>(raw), mask))
}

/// `Σ q·x` over one block for one token row, with `x` at `xp`.
///
/// # Safety
/// `xp` must be readable for 32 f32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn block_dot(q: &[__m256; 4], xp: *const f32) -> (__m256, [__m256; 4]) {
    // SAFETY: the caller guarantees 32 readable f32.
    let x = unsafe {
        [_mm256_loadu_ps(xp), _mm256_loadu_ps(xp.add(8)), _mm256_loadu_ps(xp.add(16)), _mm256_loadu_ps(xp.add(24))]
    };
    let t0 = _mm256_fmadd_ps(q[2], x[2], _mm256_mul_ps(q[0], x[0]));
    let t1 = _mm256_fmadd_ps(q[3], x[3], _mm256_mul_ps(q[1], x[1]));
    (_mm256_add_ps(t0, t1), x)
}

/// The shared loop: `widen(block) -> (values, scale, minimum)`; the minimum term is skipped
/// unless `WITH_MIN`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn dot_rows_with<B, const M: usize, const WITH_MIN: bool>(
    xs: [&[f32]; M],
    w: &[B],
    widen: impl Fn(&B) -> ([__m256; 4], __m256, __m256),
) -> [f32; M] {
    let k = w.len() * QK;
    assert!(xs.iter().all(|x| x.len() == k), "token rows must match the weight row");
    let mut acc = [_mm256_setzero_ps(); M];
    let mut acc_min = [_mm256_setzero_ps(); M];
    for (bi, b) in w.iter().enumerate() {
        let (q, d, m) = widen(b);
        for a in 0..M {
            // SAFETY: `bi * QK + 32 <= k == xs[a].len()`.
            let (t, x) = unsafe { block_dot(&q, xs[a].as_ptr().add(bi * QK)) };
            acc[a] = _mm256_fmadd_ps(t, d, acc[a]);
            if WITH_MIN {
                let sx = _mm256_add_ps(_mm256_add_ps(x[0], x[1]), _mm256_add_ps(x[2], x[3]));
                acc_min[a] = _mm256_fmadd_ps(sx, m, acc_min[a]);
            }
        }
    }
    std::array::from_fn(|a| hsum(if WITH_MIN { _mm256_add_ps(acc[a], acc_min[a]) } else { acc[a] }))
}

impl Kernel for BlockQ8_0 {
    unsafe fn dot_rows<const M: usize>(xs: [&[f32]; M], w: &[Self]) -> [f32; M] {
        #[target_feature(enable = "avx2,fma,f16c")]
        fn go<const M: usize>(xs: [&[f32]; M], w: &[BlockQ8_0]) -> [f32; M] {
            dot_rows_with::<_, M, false>(xs, w, |b| {
                let p = b.qs.as_ptr().cast::<__m128i>();
                // SAFETY: `qs` is 32 bytes: two 16-byte loads.
                let (lo, hi) = unsafe { (_mm_loadu_si128(p), _mm_loadu_si128(p.add(1))) };
                (widen_i8(lo, hi), splat_f16(b.d), _mm256_setzero_ps())
            })
        }
        // SAFETY: the caller guarantees the features `go` is compiled for.
        unsafe { go(xs, w) }
    }
}

impl Kernel for BlockQ4_0 {
    unsafe fn dot_rows<const M: usize>(xs: [&[f32]; M], w: &[Self]) -> [f32; M] {
        #[target_feature(enable = "avx2,fma,f16c")]
        fn go<const M: usize>(xs: [&[f32]; M], w: &[BlockQ4_0]) -> [f32; M] {
            dot_rows_with::<_, M, false>(xs, w, |b| {
                // SAFETY: `qs` is 16 bytes.
                let (lo, hi) = unsafe { nibbles(b.qs.as_ptr()) };
                let eight = _mm_set1_epi8(8);
                (widen_i8(_mm_sub_epi8(lo, eight), _mm_sub_epi8(hi, eight)), splat_f16(b.d), _mm256_setzero_ps())
            })
        }
        // SAFETY: the caller guarantees the features `go` is compiled for.
        unsafe { go(xs, w) }
    }
}

impl Kernel for BlockQ4_1 {
    unsafe fn dot_rows<const M: usize>(xs: [&[f32]; M], w: &[Self]) -> [f32; M] {
        #[target_feature(enable = "avx2,fma,f16c")]
        fn go<const M: usize>(xs: [&[f32]; M], w: &[BlockQ4_1]) -> [f32; M] {
            dot_rows_with::<_, M, true>(xs, w, |b| {
                // SAFETY: `qs` is 16 bytes.
                let (lo, hi) = unsafe { nibbles(b.qs.as_ptr()) };
                // Nibbles are 0..16, so widening them as signed bytes is exact.
                (widen_i8(lo, hi), splat_f16(b.d), splat_f16(b.m))
            })
        }
        // SAFETY: the caller guarantees the features `go` is compiled for.
        unsafe { go(xs, w) }
    }
}
