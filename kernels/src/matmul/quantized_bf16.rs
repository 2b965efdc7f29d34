//! Block-quantised weight rows read by the AVX-512 BF16 dot products ([`Bf16Row`]).
//!
//! Each block's 32 values are dequantised in registers — bytes or nibbles widened, converted,
//! scaled by the block's f16 `d` (Q4_1: `q·d + m` in one FMA) — and rounded to bf16 (nearest
//! even), one 512-bit vector per block. The products with the bf16-rounded token rows are then
//! exact and summed in f32, so against the reference each weight and each token value carries
//! at most 2⁻⁹ relative rounding, as on the bf16-weight path. Decode-sized calls of 2 to 8 token
//! rows on [`Isa::Avx512Bf16`](crate::Isa::Avx512Bf16) take this path where the call does not
//! allow 8-bit token rows (Q8_0 otherwise takes `quantized_vnni`), Q8_0 from 3 rows on (fewer
//! take `quantized_i16`): one `vdpbf16ps` per block and token instead of four f32 FMAs, which
//! keeps batched decode from being bound by arithmetic. A single Q4 token stays on the exact f32
//! path (`quantized_avx2`), so on this ISA a quantised model's lone sequence and a batched one
//! round differently.

use std::arch::x86_64::*;

use super::bf16_dot::Bf16Row;
use super::quantized_avx2::nibbles;
use crate::quant::{BlockQ4_0, BlockQ4_1, BlockQ8_0, QK};

/// A block format that dequantises to bf16 in registers.
pub(super) trait DequantBf16: Copy {
    /// The block's 32 values as bf16.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW, VL and BF16, and F16C.
    unsafe fn to_bf16(&self) -> __m512bh;
}

/// One weight row of blocks.
#[derive(Clone, Copy)]
pub(super) struct QuantRow<'a, B>(pub &'a [B]);

impl<B: DequantBf16> Bf16Row for QuantRow<'_, B> {
    fn len(&self) -> usize {
        self.0.len() * QK
    }

    #[inline]
    unsafe fn chunk(self, c: usize, _mask: u32) -> __m512bh {
        // Rows are whole blocks, so every chunk is one full block.
        // SAFETY: the caller guarantees the features and `c < len`.
        unsafe { self.0[c / QK].to_bf16() }
    }

    fn addr(self, c: usize) -> *const u8 {
        self.0.as_ptr().cast::<u8>().wrapping_add(c / QK * std::mem::size_of::<B>())
    }
}

/// An f16 widened and broadcast to 16 lanes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c")]
#[inline]
fn splat_f16(h: half::f16) -> __m512 {
    _mm512_cvtph_ps(_mm256_set1_epi16(h.to_bits() as i16))
}

/// Two 16-lane f32 vectors (values 0..16 and 16..32) rounded to 32 bf16 values in order.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c")]
#[inline]
fn pack(lo: __m512, hi: __m512) -> __m512bh {
    // The second operand fills the low half of the result.
    _mm512_cvtne2ps_pbh(hi, lo)
}

/// 16 signed bytes → 16 f32.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c")]
#[inline]
fn widen(v: __m128i) -> __m512 {
    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v))
}

impl DequantBf16 for BlockQ8_0 {
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c")]
    #[inline]
    unsafe fn to_bf16(&self) -> __m512bh {
        let p = self.qs.as_ptr().cast::<__m128i>();
        // SAFETY: `qs` is 32 bytes: two 16-byte loads.
        let (lo, hi) = unsafe { (_mm_loadu_si128(p), _mm_loadu_si128(p.add(1))) };
        let d = splat_f16(self.d);
        pack(_mm512_mul_ps(widen(lo), d), _mm512_mul_ps(widen(hi), d))
    }
}

impl DequantBf16 for BlockQ4_0 {
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c")]
    #[inline]
    unsafe fn to_bf16(&self) -> __m512bh {
        // SAFETY: `qs` is 16 bytes.
        let (lo, hi) = unsafe { nibbles(self.qs.as_ptr()) };
        let (eight, d) = (_mm_set1_epi8(8), splat_f16(self.d));
        let scaled = |v: __m128i| _mm512_mul_ps(widen(_mm_sub_epi8(v, eight)), d);
        pack(scaled(lo), scaled(hi))
    }
}

impl DequantBf16 for BlockQ4_1 {
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c")]
    #[inline]
    unsafe fn to_bf16(&self) -> __m512bh {
        // SAFETY: `qs` is 16 bytes.
        let (lo, hi) = unsafe { nibbles(self.qs.as_ptr()) };
        let (d, m) = (splat_f16(self.d), splat_f16(self.m));
        // Nibbles are 0..16, so widening them as signed bytes is exact.
        pack(_mm512_fmadd_ps(widen(lo), d, m), _mm512_fmadd_ps(widen(hi), d, m))
    }
}
