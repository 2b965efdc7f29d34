//! Decode-sized matmuls of 2 to 8 token rows against Q8_0 weights with AVX-512 VNNI integer dot
//! products ([`Isa::Avx512Bf16`](crate::Isa::Avx512Bf16), which implies VNNI), for calls that
//! allow 8-bit token rows ([`InputRounding::Int8`](super::InputRounding::Int8)).
//!
//! The call's token rows are quantised once, as ggml's Q8_0 × Q8_0 path does (`quantize`): per
//! 32-value block, `d = max|x| / 127` and `q = round(x / d)` (computed as `x · (1/d)`, ties to
//! even), so `|q| ≤ 127`. Against the reference (f32 token values) that is the only error: each
//! value moves by at most `d / 2` of its block.
//!
//! Blocks go in groups of eight, one per 32-bit lane. The token rows are stored with each group's
//! blocks interleaved in 4-byte steps, and each weight row's group is transposed the same way in
//! registers (once for all the token rows), so eight `vpdpbusd` — 32 unsigned by 32 signed bytes,
//! added in fours into 8 int32 lanes — leave every block's whole integer dot product in its own
//! lane with no horizontal sums. The weight bytes are made unsigned by adding 128, and the
//! token's precomputed `-128 · Σ q_x` per block starts its integer sum, so the integer results are
//! exact. One conversion, one multiply by the token's block scales and one FMA by the weight's
//! finish the group into the token's float lanes, summed by one fixed tree at the end of the row.
//! A token's sum is therefore formed the same way whatever else is in the batch. A row's last
//! group is padded with zero blocks.
//!
//! Per block and token this is one `vpdpbusd` plus an eighth of the group's conversion, where the
//! bf16 path (`quantized_bf16`) pays a `vdpbf16ps` and the dequantisation of every block to bf16.

use std::arch::x86_64::*;

use super::{Shape, Task};
use crate::quant::{BlockQ8_0, QK};
use crate::simd::SharedOut;
use crate::simd::avx2::hsum;

/// Most token rows this path takes; `rows` dispatches on each count up to 8 (though `path` in
/// `matmul.rs` keeps a lone token, which is memory-bound, on the exact f32 path).
pub(super) const MAX_TOKENS: usize = super::DECODE_MAX_TOKENS;
const _: () = assert!(MAX_TOKENS == 8, "quantized_vnni::rows has one arm per token count up to 8");

/// Blocks per group: one 32-bit lane of a 256-bit vector each.
const GROUP: usize = 8;
/// Bytes of one group's interleaved values.
const GROUP_BYTES: usize = GROUP * QK;

/// How far ahead of the group being multiplied the weight stream is prefetched when several
/// token rows share a row (about 7 groups).
const PREFETCH_AHEAD_BYTES: usize = 2048;

/// A call's token rows quantised to 8 bits per 32-value block, in groups of [`GROUP`] blocks (the
/// last group of a row padded with zero blocks). Empty where the call has no weight on this path.
#[derive(Default)]
pub(super) struct QuantInput {
    /// Per row and group, [`GROUP_BYTES`] bytes: the group's blocks interleaved in 4-byte steps,
    /// byte `32 s + 4 j + e` being value `4 s + e` of block `j`.
    q: Vec<i8>,
    /// Per row and group, lane `j`: `-128 · Σ q` over block `j`.
    unbias: Vec<i32>,
    /// Per row and group, lane `j`: block `j`'s scale `d`.
    scales: Vec<f32>,
    /// Groups per row.
    groups: usize,
}

/// Quantises the `m` (at most [`MAX_TOKENS`]) rows of `x`, `k` values each (a multiple of 32).
///
/// # Safety
/// The CPU must have the module's features.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn quantize(x: &[f32], m: usize, k: usize) -> QuantInput {
    assert!(m <= MAX_TOKENS && k.is_multiple_of(QK) && x.len() == m * k, "decode-sized rows of whole blocks");
    let groups = (k / QK).div_ceil(GROUP);
    let mut q = vec![0i8; m * groups * GROUP_BYTES];
    let mut unbias = vec![0i32; m * groups * GROUP];
    let mut scales = vec![0.0f32; m * groups * GROUP];
    for (i, row) in x.chunks_exact(k).enumerate() {
        for (b, src) in row.chunks_exact(QK).enumerate() {
            let (g, j) = (i * groups + b / GROUP, b % GROUP);
            // SAFETY: `src` is 32 values (two 16-lane loads); the block's bytes are stored in the
            // eight 4-byte slots `32 s + 4 j` of its row and group's 256.
            unsafe {
                let lo = _mm512_loadu_ps(src.as_ptr());
                let hi = _mm512_loadu_ps(src.as_ptr().add(16));
                let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
                let d = amax / 127.0;
                let id = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
                // Default rounding (nearest even); |x · id| ≤ 127, so the narrowing never
                // saturates on finite input.
                let (qlo, qhi) = (_mm512_cvtps_epi32(_mm512_mul_ps(lo, id)), _mm512_cvtps_epi32(_mm512_mul_ps(hi, id)));
                let bytes = _mm256_set_m128i(_mm512_cvtsepi32_epi8(qhi), _mm512_cvtsepi32_epi8(qlo));
                let steps: [i32; 8] = std::mem::transmute(bytes);
                let dst = q.as_mut_ptr().add(g * GROUP_BYTES + 4 * j).cast::<i32>();
                for (s, v) in steps.iter().enumerate() {
                    dst.add(8 * s).write_unaligned(*v);
                }
                unbias[g * GROUP + j] = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
                scales[g * GROUP + j] = d;
            }
        }
    }
    QuantInput { q, unbias, scales, groups }
}

/// The task's weight rows in memory order (one linear stream per thread), each against all of
/// the task's token rows.
///
/// # Safety
/// The CPU must have the module's features; `xq` was quantised from this call's input; no other
/// thread touches the task's `out` entries.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn rows(xq: &QuantInput, w: &[BlockQ8_0], s: Shape, t: Task, out: &SharedOut) {
    let groups = (s.k / QK).div_ceil(GROUP);
    assert!(xq.groups == groups && xq.scales.len() >= t.i1 * groups * GROUP, "input quantised for this call");
    // SAFETY (every arm): the caller's contract.
    unsafe {
        match t.i1 - t.i0 {
            1 => rows_of::<1>(xq, w, s, t, out),
            2 => rows_of::<2>(xq, w, s, t, out),
            3 => rows_of::<3>(xq, w, s, t, out),
            4 => rows_of::<4>(xq, w, s, t, out),
            5 => rows_of::<5>(xq, w, s, t, out),
            6 => rows_of::<6>(xq, w, s, t, out),
            7 => rows_of::<7>(xq, w, s, t, out),
            _ => rows_of::<8>(xq, w, s, t, out),
        }
    }
}

/// [`rows`] for exactly `T` token rows.
///
/// # Safety
/// As for [`rows`]; also `t.i1 - t.i0 == T`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn rows_of<const T: usize>(xq: &QuantInput, w: &[BlockQ8_0], s: Shape, t: Task, out: &SharedOut) {
    let per_row = s.k / QK;
    for r in t.r0..t.r1 {
        let sums = dot::<T>(xq, t.i0, &w[r * per_row..(r + 1) * per_row]);
        for (a, v) in sums.iter().enumerate() {
            // SAFETY: (t.i0 + a, r) lies in this task's rectangle.
            unsafe { out.write((t.i0 + a) * s.n + r, *v) };
        }
    }
}

/// `out[a] = Σ_b d_w · d_x · Σ_j q_w · q_x` over the blocks of the weight row `w`, for the token
/// rows `i0..i0 + T` of `xq`.
///
/// Per group of 8 blocks the weight blocks are transposed in 4-byte steps, so that lane `j` of
/// every vector belongs to block `j`, like the token rows' interleaved bytes: eight `vpdpbusd`
/// then leave each block's whole integer dot product in its own lane, with no horizontal sums,
/// and one conversion, one multiply by the token's scales and one FMA by the weight's scales
/// finish the group. The weight bytes are made unsigned (`+ 128`, shared by every token row) and
/// the token's precomputed `-128 · Σ q_x` starts its integer sum, so the integer result is exact.
/// Integer sums do not depend on their order, and the float steps are the same for any `T`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn dot<const T: usize>(xq: &QuantInput, i0: usize, w: &[BlockQ8_0]) -> [f32; T] {
    let groups = xq.groups;
    assert!(w.len().div_ceil(GROUP) == groups && xq.scales.len() >= (i0 + T) * groups * GROUP, "row lengths");
    let bias = _mm256_set1_epi8(i8::MIN);
    let mut acc = [_mm256_setzero_ps(); T];
    for (g, blocks) in w.chunks(GROUP).enumerate() {
        if T >= 2 {
            // A hint: addresses past the matrix are harmless (prefetches never fault).
            let ahead = blocks.as_ptr().cast::<u8>().wrapping_add(PREFETCH_AHEAD_BYTES);
            for line in 0..std::mem::size_of_val(blocks).div_ceil(64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line).cast());
            }
        }
        let v: [__m256i; GROUP] = std::array::from_fn(|j| match blocks.get(j) {
            // SAFETY: `qs` is 32 bytes.
            Some(b) => unsafe { _mm256_loadu_si256(b.qs.as_ptr().cast()) },
            None => _mm256_setzero_si256(),
        });
        let steps = transpose(v).map(|u| _mm256_xor_si256(u, bias));
        let d = |j: usize| blocks.get(j).map_or(0, |b| b.d.to_bits() as i16);
        let dw = _mm256_cvtph_ps(_mm_set_epi16(d(7), d(6), d(5), d(4), d(3), d(2), d(1), d(0)));
        for (a, acc) in acc.iter_mut().enumerate() {
            let at = (i0 + a) * groups + g;
            // SAFETY: row `i0 + a` has group `g` (asserted above): 256 bytes at `at * 256`, 8
            // lanes at `at * 8`.
            unsafe {
                let xp = xq.q.as_ptr().add(at * GROUP_BYTES).cast::<__m256i>();
                let mut even = _mm256_loadu_si256(xq.unbias.as_ptr().add(at * GROUP).cast());
                let mut odd = _mm256_setzero_si256();
                for s in (0..GROUP).step_by(2) {
                    even = _mm256_dpbusd_epi32(even, steps[s], _mm256_loadu_si256(xp.add(s)));
                    odd = _mm256_dpbusd_epi32(odd, steps[s + 1], _mm256_loadu_si256(xp.add(s + 1)));
                }
                let dots = _mm256_cvtepi32_ps(_mm256_add_epi32(even, odd));
                let scaled = _mm256_mul_ps(dots, _mm256_loadu_ps(xq.scales.as_ptr().add(at * GROUP)));
                *acc = _mm256_fmadd_ps(scaled, dw, *acc);
            }
        }
    }
    acc.map(|v| hsum(v))
}

/// 8 × 8 transpose of 32-bit lanes: lane `j` of output `s` is lane `s` of input `j`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn transpose(v: [__m256i; 8]) -> [__m256i; 8] {
    let lo32 = |a, b| _mm256_unpacklo_epi32(a, b);
    let hi32 = |a, b| _mm256_unpackhi_epi32(a, b);
    let (t0, t1, t2, t3) = (lo32(v[0], v[1]), hi32(v[0], v[1]), lo32(v[2], v[3]), hi32(v[2], v[3]));
    let (t4, t5, t6, t7) = (lo32(v[4], v[5]), hi32(v[4], v[5]), lo32(v[6], v[7]), hi32(v[6], v[7]));
    // Within each 128-bit half: u0 holds lanes 0 (low half) and 4 (high half) of v0..v3, u1
    // lanes 1 and 5, u2 lanes 2 and 6, u3 lanes 3 and 7; u4..u7 the same of v4..v7.
    let (u0, u1) = (_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2));
    let (u2, u3) = (_mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3));
    let (u4, u5) = (_mm256_unpacklo_epi64(t4, t6), _mm256_unpackhi_epi64(t4, t6));
    let (u6, u7) = (_mm256_unpacklo_epi64(t5, t7), _mm256_unpackhi_epi64(t5, t7));
    let low = |a, b| _mm256_permute2x128_si256::<0x20>(a, b);
    let high = |a, b| _mm256_permute2x128_si256::<0x31>(a, b);
    [low(u0, u4), low(u1, u5), low(u2, u6), low(u3, u7), high(u0, u4), high(u1, u5), high(u2, u6), high(u3, u7)]
}
