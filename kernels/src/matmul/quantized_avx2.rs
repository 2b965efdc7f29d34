//! AVX2 register-dequantising dot products for the block formats ([`Kernel`] implementations).
//!
//! Per block, the 32 quantised values become four 8-lane f32 vectors of the block's weights —
//! sign- or zero-extended bytes, converted, times the block's f16 scale (plus the minimum for
//! Q4_1, `q·d + m` in one FMA). For Q8_0 and Q4_0 this is exactly ggml's dequantised value (an
//! 8-bit integer times an f16 fits f32's mantissa); for Q4_1 it is one rounding instead of two.
//! Each token row then adds the block into four accumulators of its own (one per vector), so
//! there is no per-block reduction and no per-block scale multiply per token; the four are
//! summed pairwise at the end. A token's sum is formed the same way whatever other token rows
//! share the call. Sums are in a different order from the reference, so results agree to f32
//! rounding.

use std::arch::x86_64::*;

use super::QUANT_PREFETCH_AHEAD_BYTES;
use super::quantized::Kernel;
use crate::quant::{BlockQ4_0, BlockQ4_1, BlockQ8_0, QK};
use crate::simd::avx2::hsum;

/// An f16 widened and broadcast to 8 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn splat_f16(h: half::f16) -> __m256 {
    _mm256_cvtph_ps(_mm_set1_epi16(h.to_bits() as i16))
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
pub(super) unsafe fn nibbles(p: *const u8) -> (__m128i, __m128i) {
    // SAFETY: the caller guarantees 16 readable bytes; `loadu` has no alignment requirement.
    let raw = unsafe { _mm_loadu_si128(p.cast()) };
    let mask = _mm_set1_epi8(0x0F);
    (_mm_and_si128(raw, mask), _mm_and_si128(_mm_srli_epi16::<4>(raw), mask))
}

/// `out[a] = Σ_c xs[a][c] · w[c]` for the token rows `xs` (each `w.len() * QK` long), with the
/// blocks dequantised by `B::dequantize8`; `prefetch` prefetches the weight stream ahead.
///
/// Inlined into its callers, so it is compiled with their features: with AVX-512VL's 32
/// registers, four token rows' 16 accumulators fit next to a block's four weight vectors.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn dot_rows<B: Kernel, const M: usize>(xs: [&[f32]; M], w: &[B], prefetch: bool) -> [f32; M] {
    let k = w.len() * QK;
    assert!(xs.iter().all(|x| x.len() == k), "token rows must match the weight row");
    let mut acc = [[_mm256_setzero_ps(); 4]; M];
    for (bi, b) in w.iter().enumerate() {
        if prefetch {
            // A hint: addresses past the matrix are harmless (prefetches never fault).
            let ahead = std::ptr::from_ref(b).cast::<u8>().wrapping_add(QUANT_PREFETCH_AHEAD_BYTES);
            _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
        }
        // SAFETY: the caller guarantees the features.
        let wv = unsafe { b.dequantize8() };
        for (acc_a, x) in acc.iter_mut().zip(&xs) {
            let xp = x[bi * QK..(bi + 1) * QK].as_ptr();
            for (j, (a, wj)) in acc_a.iter_mut().zip(&wv).enumerate() {
                // SAFETY: `xp` points at this block's 32 values of the token row.
                *a = _mm256_fmadd_ps(*wj, unsafe { _mm256_loadu_ps(xp.add(8 * j)) }, *a);
            }
        }
    }
    acc.map(|[a0, a1, a2, a3]| hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))))
}

impl Kernel for BlockQ8_0 {
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dequantize8(&self) -> [__m256; 4] {
        let d = splat_f16(self.d);
        let p = self.qs.as_ptr();
        // SAFETY: `qs` is 32 bytes: four 8-byte loads.
        std::array::from_fn(|j| unsafe {
            let q = _mm_loadl_epi64(p.add(8 * j).cast());
            _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d)
        })
    }
}

impl Kernel for BlockQ4_0 {
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dequantize8(&self) -> [__m256; 4] {
        // SAFETY: `qs` is 16 bytes.
        let (lo, hi) = unsafe { nibbles(self.qs.as_ptr()) };
        let eight = _mm_set1_epi8(8);
        let d = splat_f16(self.d);
        widen_i8(_mm_sub_epi8(lo, eight), _mm_sub_epi8(hi, eight)).map(|v| _mm256_mul_ps(v, d))
    }
}

impl Kernel for BlockQ4_1 {
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dequantize8(&self) -> [__m256; 4] {
        // SAFETY: `qs` is 16 bytes.
        let (lo, hi) = unsafe { nibbles(self.qs.as_ptr()) };
        let (d, m) = (splat_f16(self.d), splat_f16(self.m));
        // Nibbles are 0..16, so widening them as signed bytes is exact.
        widen_i8(lo, hi).map(|v| _mm256_fmadd_ps(v, d, m))
    }
}
