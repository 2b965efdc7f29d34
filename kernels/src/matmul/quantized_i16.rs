//! Decode-sized matmuls against Q8_0 weights with 16-bit integer dot products, on every x86 SIMD
//! ISA (AVX2 is enough): up to two tokens everywhere, and up to 8 where the ISA has no bf16 dot
//! products (see `path` in `matmul/path.rs`).
//!
//! The token rows are quantised once per call (`quantize`): per 32-value block, `d = max|x| / 32767`
//! and `q = round(x · (1/d))`, ties to even, so each value moves by at most `d / 2` — 256 times
//! less than the 8-bit rows of `quantized_vnni`, and less than bf16's rounding for every value
//! above 2⁻⁷ of its block's largest. A block with a NaN or an infinity gets a NaN scale, so the
//! sums it enters are NaN, as the f32 path's would be.
//!
//! Per weight block, `vpmovsxbw` widens the 32 weight bytes to 16 bits and two `vpmaddwd` multiply
//! them with the token's 32 values and add adjacent pairs. The integers are exact: four products
//! of at most 128 · 32767 per lane stay below 2²⁴, so the conversion to f32 is exact too. One
//! multiply (the weight's and the token's block scales) and one FMA finish the block into one of
//! the token's two accumulators (even and odd blocks), summed by one fixed tree at the end of the
//! row, so a token's sum is the same whatever other tokens share the call. For a lone token that
//! is about a dozen vector operations per 32 weights where the exact f32 path (`quantized_avx2`)
//! pays about eighteen (on the test host, hot in L2: 25 GB/s of weights per core against 15), so
//! two cores outrun memory; the weights' widening is shared by up to four tokens.

use std::arch::x86_64::*;

use super::quantized::{by_row, pad};
use super::{Shape, Task};
use crate::quant::{BlockQ8_0, QK};
use crate::simd::SharedOut;
use crate::simd::avx2::hsum;

/// The largest quantised magnitude.
const Q_MAX: f32 = 32767.0;

/// A call's token rows quantised to 16 bits per 32-value block. Empty where the call has no
/// weight on this path.
#[derive(Default)]
pub(super) struct QuantRows16 {
    /// The quantised values, row after row.
    pub(super) q: Vec<i16>,
    /// Per row and block, its scale `d` (NaN where the block holds a non-finite value).
    pub(super) scales: Vec<f32>,
}

/// Quantises the token rows `x` (each `k` values, a multiple of 32).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize(x: &[f32], k: usize) -> QuantRows16 {
    assert!(k.is_multiple_of(QK) && x.len().is_multiple_of(k), "rows of whole blocks");
    let mut q = vec![0i16; x.len()];
    let mut scales = Vec::with_capacity(x.len() / QK);
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
    for (src, dst) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)) {
        // SAFETY: `src` is 32 values, four 8-lane loads.
        let v: [__m256; 4] = std::array::from_fn(|j| unsafe { _mm256_loadu_ps(src.as_ptr().add(8 * j)) });
        let amax = hmax(v.iter().fold(_mm256_setzero_ps(), |m, &x| _mm256_max_ps(m, _mm256_and_ps(x, abs_mask))));
        // Any NaN or infinity makes this sum NaN (`max` alone may drop a NaN).
        let zero = _mm256_setzero_ps();
        let poisoned = hsum(v.iter().fold(zero, |s, &x| _mm256_add_ps(s, _mm256_mul_ps(x, zero)))).is_nan();
        let d = if poisoned { f32::NAN } else { amax / Q_MAX };
        let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        // Default rounding (nearest even); |x · id| ≤ 32767 up to a rounding of `1/d`, and the
        // narrowing saturates.
        let [a, b, c, e] = v.map(|x| _mm256_cvtps_epi32(_mm256_mul_ps(x, id)));
        // `packs` narrows within 128-bit halves; the permute puts the values back in order.
        let lo = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(a, b));
        let hi = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(c, e));
        // SAFETY: `dst` is 32 values, two 16-lane stores.
        unsafe {
            _mm256_storeu_si256(dst.as_mut_ptr().cast(), lo);
            _mm256_storeu_si256(dst.as_mut_ptr().add(16).cast(), hi);
        }
        scales.push(d);
    }
    QuantRows16 { q, scales }
}

/// The largest of the 8 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hmax(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)))
}

/// The task's weight rows in memory order; for each, its token rows up to four at a time.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `xq` was quantised from this call's token rows; no other
/// thread touches the task's `out` entries.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn rows(xq: &QuantRows16, w: &[BlockQ8_0], s: Shape, t: Task, out: &SharedOut) {
    let per_row = s.k / QK;
    assert!(xq.scales.len() >= t.i1 * per_row, "token rows quantised for this call");
    let tok = |i: usize| Token { q: &xq.q[i * s.k..(i + 1) * s.k], scales: &xq.scales[i * per_row..(i + 1) * per_row] };
    // SAFETY: the caller's contract; every token row has the row's blocks (asserted above).
    unsafe {
        by_row(w, s, t, 4, out, |row, i, n| match n {
            1 => pad(dot_rows([tok(i)], row)),
            2 => pad(dot_rows([tok(i), tok(i + 1)], row)),
            3 => pad(dot_rows([tok(i), tok(i + 1), tok(i + 2)], row)),
            _ => dot_rows([tok(i), tok(i + 1), tok(i + 2), tok(i + 3)], row),
        })
    }
}

/// One quantised token row.
#[derive(Clone, Copy)]
struct Token<'a> {
    q: &'a [i16],
    scales: &'a [f32],
}

/// `Σ_c x_c · w_c` for each quantised token row and one weight row of as many blocks. A token's
/// sum is formed the same way whatever other rows share the call.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_rows<const M: usize>(xs: [Token; M], w: &[BlockQ8_0]) -> [f32; M] {
    assert!(xs.iter().all(|x| x.scales.len() == w.len() && x.q.len() == w.len() * QK), "matching block counts");
    // Even and odd blocks, named rather than indexed so that they stay in registers.
    let (mut even, mut odd) = ([_mm256_setzero_ps(); M], [_mm256_setzero_ps(); M]);
    let mut pairs = w.chunks_exact(2);
    for (p, pair) in pairs.by_ref().enumerate() {
        // SAFETY: blocks `2p` and `2p + 1` lie in every token row (asserted lengths).
        unsafe {
            block(&xs, 2 * p, &pair[0], &mut even);
            block(&xs, 2 * p + 1, &pair[1], &mut odd);
        }
    }
    if let [last] = pairs.remainder() {
        // SAFETY: as above, for the last block.
        unsafe { block(&xs, w.len() - 1, last, &mut even) };
    }
    std::array::from_fn(|a| hsum(_mm256_add_ps(even[a], odd[a])))
}

/// Adds block `bi` of each token row times the weight block `b` into that row's accumulator.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; every token row has block `bi`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn block<const M: usize>(xs: &[Token; M], bi: usize, b: &BlockQ8_0, acc: &mut [__m256; M]) {
    // SAFETY: a block has 32 weight bytes.
    let (wlo, whi) = unsafe {
        let wq = b.qs.as_ptr();
        (_mm256_cvtepi8_epi16(_mm_loadu_si128(wq.cast())), _mm256_cvtepi8_epi16(_mm_loadu_si128(wq.add(16).cast())))
    };
    let dw = _mm256_cvtph_ps(_mm_set1_epi16(b.d.to_bits() as i16));
    for (acc, x) in acc.iter_mut().zip(xs) {
        // SAFETY: block `bi` of the token row has 32 values and a scale (the caller's contract;
        // unchecked, as this is the innermost loop).
        let (ints, dx) = unsafe {
            let xv = x.q.as_ptr().add(bi * QK);
            let ints = _mm256_add_epi32(
                _mm256_madd_epi16(wlo, _mm256_loadu_si256(xv.cast())),
                _mm256_madd_epi16(whi, _mm256_loadu_si256(xv.add(16).cast())),
            );
            (ints, _mm256_broadcast_ss(&*x.scales.as_ptr().add(bi)))
        };
        let scale = _mm256_mul_ps(dw, dx);
        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ints), scale, *acc);
    }
}
