//! The AVX-512 BF16 body of one (query token, KV head group) task over a bf16 cache, for pools
//! whose input rounding allows bf16 ([`InputRounding::Bf16`](crate::matmul::InputRounding)), as
//! GPU attention kernels round: the query and the softmax weights are rounded to bf16 (nearest
//! even) and meet the cache rows through `vdpbf16ps` — 32 products per instruction, and no
//! widening of the cache entries — with every sum in f32.
//!
//! - Scores: per head, 16 positions at a time, each (head, position) one accumulator over the row's
//!   32-value chunks, the 16 reduced by one transposing tree ([`lane_sums`]).
//! - Values: positions in pairs. The pair's two V rows are interleaved 16 bits at a time
//!   (`vpunpck{l,h}wd`, which works within 128-bit lanes, so an accumulator's lanes hold a fixed
//!   permutation of the head's dimensions, undone once at the end) and multiplied with the pair's
//!   two weights broadcast as one 32-bit bf16 pair: one `vdpbf16ps` adds both positions' terms for
//!   16 dimensions. An odd last position is paired with zeros.
//!
//! On the test host (SmolLM2-135M's cache: 3 KV heads of 64, 9 query heads, context 160;
//! in-process A/B runs against the f32 kernels, `x86`) a layer took 25 µs instead of 38–43 at
//! batch 8 and 4 instead of 6.4 at batch 1 with the cache in L2, and 41–45 µs instead of 48–55,
//! 7.9 instead of 9–13, read from memory.
//!
//! Against the exact kernels each query value and each weight moves by at most 2⁻⁹ of itself;
//! the chunk result (`chunks`) keeps the f32 maximum and the f32 sum of the unrounded weights.
//! A head's sums are formed in an order fixed by its positions alone, so results do not depend on
//! the batch or on how many heads share a pass.

use std::arch::x86_64::*;

use half::bf16;

use super::prefetch_rows;
use super::x86::Rows;
use crate::isa::Isa;
use crate::simd::avx512::{lane_sums, load_bf16, round_bf16_into};
use crate::softmax::exp_shifted_isa;

/// Positions whose scores one tree reduces.
const POS: usize = 16;
/// Positions ahead whose K rows the first head's scores prefetch.
const K_AHEAD: usize = 2 * POS;

/// Whether this path takes heads of `head_dim`: whole 32-value chunks, at most four per row (the
/// values' accumulators must fit the registers).
pub(super) fn takes(head_dim: usize) -> bool {
    head_dim.is_multiple_of(32) && (32..=128).contains(&head_dim)
}

/// Per-thread buffers of the path.
#[derive(Default)]
pub(super) struct Scratch {
    /// The group's query heads rounded to bf16 (raw bits).
    q: Vec<u16>,
    /// Per head, its weights rounded to bf16 in pairs of positions (the last padded with zero).
    weights: Vec<u32>,
}

/// One group task (see `x86::group_avx2` for the arguments' shapes and what `out` and `stats`
/// receive).
///
/// # Safety
/// The CPU must have AVX-512 F, BW, VL and BF16, AVX2, FMA and F16C; [`takes`] holds for
/// `rows.head_dim`; every offset starts a row of `head_dim` entries in `k` and `v`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn group(
    isa: Isa,
    rows: &Rows<bf16>,
    q: &[f32],
    scores: &mut [f32],
    out: &mut [f32],
    stats: &mut [f32],
    scratch: &mut Scratch,
) {
    let (hd, n) = (rows.head_dim, rows.offsets.len());
    let heads = q.len() / hd;
    scratch.q.clear();
    scratch.q.resize(q.len(), 0);
    // SAFETY: the caller's contract.
    unsafe { round_bf16_into(q, &mut scratch.q) };
    // SAFETY (both passes): the caller's contract; `scores` is `heads × n`.
    unsafe {
        match hd / 32 {
            1 => scores_pass::<1>(rows, &scratch.q, scores),
            2 => scores_pass::<2>(rows, &scratch.q, scores),
            3 => scores_pass::<3>(rows, &scratch.q, scores),
            _ => scores_pass::<4>(rows, &scratch.q, scores),
        }
    }
    let pairs = n.div_ceil(2);
    scratch.weights.clear();
    scratch.weights.resize(heads * pairs, 0);
    for (h, head_scores) in scores.chunks_exact_mut(n).enumerate() {
        (stats[h], stats[heads + h]) = exp_shifted_isa(isa, head_scores);
        // The head's weights as bf16, two to a pair, the last pair's missing second zero
        // (little-endian: a pair's first position is its low half).
        let slots = &mut scratch.weights[h * pairs..(h + 1) * pairs];
        // SAFETY: `pairs` u32 slots are `2 · pairs ≥ n` u16 ones (same memory, no padding, and
        // u16's alignment divides u32's).
        let halves = unsafe { std::slice::from_raw_parts_mut(slots.as_mut_ptr().cast::<u16>(), 2 * pairs) };
        // SAFETY: the caller's contract.
        unsafe { round_bf16_into(head_scores, &mut halves[..n]) };
    }
    // SAFETY: as above; `weights` is `heads × pairs`, `out` is `heads × hd`.
    unsafe {
        let w = &scratch.weights;
        match (hd / 32, heads_per_pass(heads, if hd <= 64 { 3 } else { 2 })) {
            (1, 1) => values::<1, 1>(rows, w, out),
            (1, 2) => values::<1, 2>(rows, w, out),
            (1, _) => values::<1, 3>(rows, w, out),
            (2, 1) => values::<2, 1>(rows, w, out),
            (2, 2) => values::<2, 2>(rows, w, out),
            (2, _) => values::<2, 3>(rows, w, out),
            (3, 1) => values::<3, 1>(rows, w, out),
            (3, _) => values::<3, 2>(rows, w, out),
            (_, 1) => values::<4, 1>(rows, w, out),
            _ => values::<4, 2>(rows, w, out),
        }
    }
}

/// Heads per values pass, at most `max` (what the registers hold). A pass loads and interleaves
/// each pair's V rows once (about the work of two heads' dot products) and then pays every head
/// slot's dot products, idle ones included, so the count minimising `passes · (2 + per pass)` is
/// taken, the larger on a tie: 3 for groups of 3, 5 to 8 or 12 heads, 2 for 2 or 4, 1 for one.
fn heads_per_pass(heads: usize, max: usize) -> usize {
    (1..=max.min(heads)).rev().min_by_key(|&h| heads.div_ceil(h) * (2 + h)).unwrap_or(1)
}

/// `scores[h·n + i] = scale · q_h · k_i` for every head, `C` chunks of 32 per row; the first head
/// prefetches the K rows [`K_AHEAD`] positions on and each block's V rows.
///
/// # Safety
/// As for [`group`], with `C == head_dim / 32`; `q` is `heads × head_dim` bf16 bits.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn scores_pass<const C: usize>(rows: &Rows<bf16>, q: &[u16], scores: &mut [f32]) {
    let (k, offsets, hd) = (rows.k, rows.offsets, rows.head_dim);
    let n = offsets.len();
    let scale = _mm512_set1_ps(rows.scale);
    for (h, qh) in q.chunks_exact(hd).enumerate() {
        // SAFETY: `qh` is `C` chunks of 32.
        let qv: [__m512bh; C] = std::array::from_fn(|c| unsafe { load_bf16(qh.as_ptr().add(32 * c), u32::MAX) });
        for (b, offs) in offsets.chunks(POS).enumerate() {
            if h == 0 {
                prefetch_rows(k, offsets, b * POS + K_AHEAD, POS, hd);
                prefetch_rows(rows.v, offsets, b * POS, POS, hd);
            }
            // SAFETY (both arms): the rows at `offs` have `32 C` entries.
            let sums = match <&[usize; POS]>::try_from(offs) {
                // A whole block: fixed-size loops and tree, so the accumulators stay in registers.
                Ok(offs) => lane_sums(&unsafe { block_scores(k, &qv, offs) }),
                Err(_) => lane_sums(&unsafe { block_scores(k, &qv, offs) }[..offs.len()]),
            };
            let dst = &mut scores[h * n + b * POS..h * n + b * POS + offs.len()];
            // SAFETY: `sums` is 16 floats.
            let scaled = _mm512_mul_ps(unsafe { _mm512_loadu_ps(sums.as_ptr()) }, scale);
            // SAFETY: the masked-in lanes are `0..offs.len()`, inside `dst`.
            unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr(), (1u32 << offs.len()).wrapping_sub(1) as u16, scaled) };
        }
    }
}

/// One accumulator per position of `offs` (at most [`POS`]; the rest zero): `q · k` in 32-value
/// chunks.
///
/// # Safety
/// The CPU must have the module's features; every row at `offs` has `32 C` entries.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
unsafe fn block_scores<const C: usize>(k: &[bf16], qv: &[__m512bh; C], offs: &[usize]) -> [__m512; POS] {
    let mut acc = [_mm512_setzero_ps(); POS];
    for (a, &off) in acc.iter_mut().zip(offs) {
        for (c, qc) in qv.iter().enumerate() {
            // SAFETY: the caller's contract.
            *a = _mm512_dpbf16_ps(*a, *qc, unsafe { load_bf16(k.as_ptr().add(off + 32 * c).cast(), u32::MAX) });
        }
    }
    acc
}

/// `out_h = Σ_i w_h[i] · v_i` for every head, `H` heads per pass ([`heads_per_pass`]) and `C`
/// chunks of 32 per row; the first pass prefetches the next task's K rows, spread over the pairs.
///
/// # Safety
/// As for [`group`], with `C == head_dim / 32`; `weights` is `heads × ⌈n / 2⌉` bf16 pairs.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn values<const C: usize, const H: usize>(rows: &Rows<bf16>, weights: &[u32], out: &mut [f32]) {
    let (v, offsets, hd) = (rows.v, rows.offsets, rows.head_dim);
    let pairs = offsets.len().div_ceil(2);
    let heads = out.len() / hd;
    for h0 in (0..heads).step_by(H) {
        let take = (heads - h0).min(H);
        // Per head of the pass and chunk: the low and high interleaved halves.
        let mut acc = [[[_mm512_setzero_ps(); 2]; C]; H];
        for j in 0..pairs {
            if h0 == 0 {
                let next = rows.next_offsets.len();
                let from = j * next / pairs;
                prefetch_rows(rows.k, rows.next_offsets, from, (j + 1) * next / pairs - from, hd);
            }
            let w: [__m512bh; H] = std::array::from_fn(|h| {
                let pair = if h < take { weights[(h0 + h) * pairs + j] } else { 0 };
                // SAFETY: a bf16 pair and a 32-bit lane have the same size.
                unsafe { std::mem::transmute(_mm512_set1_epi32(pair as i32)) }
            });
            let (first, second) = (offsets[2 * j], offsets.get(2 * j + 1).copied());
            for c in 0..C {
                // SAFETY: the rows at `first` and `second` have `32 C` entries.
                let a = unsafe { _mm512_loadu_si512(v.as_ptr().add(first + 32 * c).cast()) };
                let b = match second {
                    Some(off) => unsafe { _mm512_loadu_si512(v.as_ptr().add(off + 32 * c).cast()) },
                    None => _mm512_setzero_si512(),
                };
                // SAFETY (both): same-sized reinterpretations.
                let lo: __m512bh = unsafe { std::mem::transmute(_mm512_unpacklo_epi16(a, b)) };
                let hi: __m512bh = unsafe { std::mem::transmute(_mm512_unpackhi_epi16(a, b)) };
                // Every head of the pass, so that the loop has a fixed length (a missing head's
                // weights are zero and its sums unused).
                for (acc_h, w_h) in acc.iter_mut().zip(&w) {
                    acc_h[c][0] = _mm512_dpbf16_ps(acc_h[c][0], *w_h, lo);
                    acc_h[c][1] = _mm512_dpbf16_ps(acc_h[c][1], *w_h, hi);
                }
            }
        }
        for (h, acc_h) in acc.iter().enumerate().take(take) {
            let dst = &mut out[(h0 + h) * hd..(h0 + h + 1) * hd];
            for (c, halves) in acc_h.iter().enumerate() {
                for (half, v) in halves.iter().enumerate() {
                    let mut lanes = [0.0f32; 16];
                    // SAFETY: `lanes` is 16 floats.
                    unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *v) };
                    // Lane `4 l + e` of 128-bit lane `l` holds dimension `8 l + 4 half + e`.
                    for (i, x) in lanes.iter().enumerate() {
                        dst[32 * c + 8 * (i / 4) + 4 * half + i % 4] = *x;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::heads_per_pass;

    #[test]
    fn passes_take_the_heads_that_waste_least() {
        let per = |heads| heads_per_pass(heads, 3);
        assert_eq!([1, 2, 3, 4, 5, 6, 7, 8, 12].map(per), [1, 2, 3, 2, 3, 3, 3, 3, 3]);
        assert_eq!(heads_per_pass(3, 2), 2);
        assert_eq!(heads_per_pass(1, 2), 1);
    }
}
