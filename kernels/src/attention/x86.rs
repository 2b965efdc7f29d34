//! The x86 SIMD body of one (query token, KV head group) task: scores, softmax, weighted sum of
//! values, with the group's query heads taken `H` at a time.
//!
//! Within a pass, every K and V row chunk is loaded once for the pass's `H` heads, and each
//! (head, position) or (head, value dimension) pair has its own accumulator, so `H` heads give
//! `H` times as many independent FMA chains per load. With AVX-512's 32 vector registers three
//! heads fit (24 accumulators); with AVX2's 16, one. A head's sums are formed in the same order
//! whatever `H` is, so both ISAs give the same bits, and results do not depend on the batch.

use std::arch::x86_64::*;

use super::{PREFETCH_BLOCKS, prefetch_rows};
use crate::isa::Isa;
use crate::simd::Elem;
use crate::simd::avx2::{load, reduce8, store};
use crate::softmax::exp_shifted_isa;

/// Positions whose scores one block computes together (one `reduce8`).
const POS: usize = 8;
/// Value dimensions one pass keeps in registers per head (8 vectors).
const DIMS: usize = 64;

/// What a group task reads: K and V of the layer, the rows' offsets in visible-position order
/// (and the next task's, whose K rows it prefetches), the head size and the score scale.
pub(super) struct Rows<'a, E> {
    pub k: &'a [E],
    pub v: &'a [E],
    pub offsets: &'a [usize],
    pub next_offsets: &'a [usize],
    pub head_dim: usize,
    pub scale: f32,
}

/// One group task on AVX2: `q` holds the group's query heads, `scores` has room for
/// `heads × offsets.len()`; `out` receives each head's unnormalised weighted sum of values and
/// `stats` its largest score, then its sum of shifted exponentials (a chunk result, see
/// `chunks`).
///
/// # Safety
/// The CPU must have AVX2 and FMA; every offset starts a row of `head_dim` floats in `k` and `v`;
/// `head_dim` is a multiple of 8; `q`, `out` are `heads × head_dim`, `scores` is
/// `heads × offsets.len()` and `stats` is `2 × heads`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn group_avx2<E: Elem>(
    isa: Isa,
    rows: &Rows<E>,
    q: &[f32],
    scores: &mut [f32],
    out: &mut [f32],
    stats: &mut [f32],
) {
    // SAFETY: the caller's contract.
    unsafe { avx2::group::<E, 1>(isa, rows, q, scores, out, stats) }
}

/// [`group_avx2`] with AVX-512's registers: three heads per pass.
///
/// # Safety
/// As for [`group_avx2`], and the CPU must have AVX-512F and AVX-512VL.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
pub(super) unsafe fn group_avx512<E: Elem>(
    isa: Isa,
    rows: &Rows<E>,
    q: &[f32],
    scores: &mut [f32],
    out: &mut [f32],
    stats: &mut [f32],
) {
    // SAFETY: the caller's contract.
    unsafe { avx512::group::<E, 3>(isa, rows, q, scores, out, stats) }
}

/// Defines `group` and the passes it runs, compiled with `$features`: in the AVX-512 module the
/// passes get AVX-512's 32 vector registers even where LLVM does not inline them into their
/// caller, so three heads' 24 accumulators stay in registers rather than spilling.
macro_rules! group_kernels {
    ($features:literal) => {
        /// Scores of every head, shifted exponentials per head, then values; heads go `H` at a
        /// time (the rest fewer).
        #[target_feature(enable = $features)]
        #[inline]
        pub(super) unsafe fn group<E: Elem, const H: usize>(
            isa: Isa,
            rows: &Rows<E>,
            q: &[f32],
            scores: &mut [f32],
            out: &mut [f32],
            stats: &mut [f32],
        ) {
            let (hd, n) = (rows.head_dim, rows.offsets.len());
            let heads = q.len() / hd;
            // SAFETY (every pass): the caller's contract; each pass gets its heads' contiguous slices.
            for (h, take) in passes(heads, H) {
                let (qs, ss) = (&q[h * hd..(h + take) * hd], &mut scores[h * n..(h + take) * n]);
                unsafe {
                    match take {
                        3 => scores_pass::<E, 3>(rows, qs, ss, h == 0),
                        2 => scores_pass::<E, 2>(rows, qs, ss, h == 0),
                        _ => scores_pass::<E, 1>(rows, qs, ss, h == 0),
                    }
                }
            }
            for (h, head_scores) in scores.chunks_exact_mut(n).enumerate() {
                (stats[h], stats[heads + h]) = exp_shifted_isa(isa, head_scores);
            }
            for (h, take) in passes(heads, H) {
                let (ss, os) = (&scores[h * n..(h + take) * n], &mut out[h * hd..(h + take) * hd]);
                unsafe {
                    match take {
                        3 => values_pass::<E, 3>(rows, ss, os, h == 0),
                        2 => values_pass::<E, 2>(rows, ss, os, h == 0),
                        _ => values_pass::<E, 1>(rows, ss, os, h == 0),
                    }
                }
            }
        }

        /// `scores[h·n + i] = scale · q_h · k_i` for the pass's `H` heads: 8 positions at a time, each
        /// (head, position) an FMA chain over the head dimension, the 8 chains of a head reduced
        /// together. `first` passes prefetch the K rows ahead and each block's V rows (later passes
        /// find them in cache).
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn scores_pass<E: Elem, const H: usize>(rows: &Rows<E>, q: &[f32], scores: &mut [f32], first: bool) {
            let (k, offsets, hd) = (rows.k, rows.offsets, rows.head_dim);
            let n = offsets.len();
            let vscale = _mm256_set1_ps(rows.scale);
            let mut blocks = offsets.chunks_exact(POS);
            for (b, offs) in blocks.by_ref().enumerate() {
                if first {
                    prefetch_rows(k, offsets, (b + PREFETCH_BLOCKS) * POS, POS, hd);
                    prefetch_rows(rows.v, offsets, b * POS, POS, hd);
                }
                let mut acc = [[_mm256_setzero_ps(); POS]; H];
                for d in (0..hd).step_by(8) {
                    // SAFETY (all loads and stores here): `d + 8 <= hd`, each head's query is `hd` long,
                    // every offset starts a row of `hd` floats in `k`, and block `b` of each head's scores
                    // lies inside `scores`.
                    let qv: [__m256; H] = std::array::from_fn(|h| unsafe { load(q, h * hd + d) });
                    for (p, &off) in offs.iter().enumerate() {
                        let kv = unsafe { E::load8(k.as_ptr().add(off + d)) };
                        for (acc_h, qv_h) in acc.iter_mut().zip(&qv) {
                            acc_h[p] = _mm256_fmadd_ps(*qv_h, kv, acc_h[p]);
                        }
                    }
                }
                for (h, acc_h) in acc.iter().enumerate() {
                    unsafe { store(scores, h * n + b * POS, _mm256_mul_ps(reduce8(*acc_h), vscale)) };
                }
            }
            let done = n - blocks.remainder().len();
            if first {
                prefetch_rows(rows.v, offsets, done, n - done, hd);
            }
            for (i, &off) in blocks.remainder().iter().enumerate() {
                for h in 0..H {
                    let qh = &q[h * hd..(h + 1) * hd];
                    scores[h * n + done + i] = unsafe { dot_row(qh, &k[off..off + hd]) } * rows.scale;
                }
            }
        }

        /// `q · k` for one row: one FMA chain over 8-lane chunks, then a horizontal sum.
        ///
        /// # Safety
        /// The CPU must have AVX2, FMA and F16C; `q.len() == k.len()`, a multiple of 8.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn dot_row<E: Elem>(q: &[f32], k: &[E]) -> f32 {
            let mut acc = _mm256_setzero_ps();
            for d in (0..q.len()).step_by(8) {
                // SAFETY: `d + 8 <= len` for both rows.
                acc = _mm256_fmadd_ps(unsafe { load(q, d) }, unsafe { E::load8(k.as_ptr().add(d)) }, acc);
            }
            crate::simd::avx2::hsum(acc)
        }

        /// `out_h = Σ_i scores[h·n + i] · v_i` for the pass's `H` heads, 64 dimensions at a time: each
        /// position's value chunk is loaded once and added into every head's accumulators, which stay in
        /// registers over all positions. `first` passes prefetch the next task's K rows, spread
        /// over the positions.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn values_pass<E: Elem, const H: usize>(rows: &Rows<E>, scores: &[f32], out: &mut [f32], first: bool) {
            let (v, offsets, hd) = (rows.v, rows.offsets, rows.head_dim);
            let n = offsets.len();
            for d0 in (0..hd).step_by(DIMS) {
                let vectors = (hd - d0).min(DIMS) / 8;
                let mut acc = [[_mm256_setzero_ps(); DIMS / 8]; H];
                if vectors == DIMS / 8 {
                    // The next task's K rows, `per_position` at each position (one division here,
                    // none per position: a 64-bit division costs more than a position's FMAs).
                    let per_position = if first && d0 == 0 { rows.next_offsets.len().div_ceil(n) } else { 0 };
                    // A full 64-dim slice: fixed-size loops, so the accumulators stay in registers.
                    for (i, &off) in offsets.iter().enumerate() {
                        if per_position > 0 {
                            prefetch_rows(rows.k, rows.next_offsets, i * per_position, per_position, hd);
                        }
                        let w: [__m256; H] = std::array::from_fn(|h| _mm256_set1_ps(scores[h * n + i]));
                        for j in 0..DIMS / 8 {
                            // SAFETY: `d0 + 8 j + 8 <= hd`; the row at `off` has `hd` floats.
                            let vv = unsafe { E::load8(v.as_ptr().add(off + d0 + 8 * j)) };
                            for (acc_h, w_h) in acc.iter_mut().zip(&w) {
                                acc_h[j] = _mm256_fmadd_ps(*w_h, vv, acc_h[j]);
                            }
                        }
                    }
                } else {
                    for (i, &off) in offsets.iter().enumerate() {
                        let w: [__m256; H] = std::array::from_fn(|h| _mm256_set1_ps(scores[h * n + i]));
                        for j in 0..vectors {
                            // SAFETY: `d0 + 8 j + 8 <= hd`; the row at `off` has `hd` floats.
                            let vv = unsafe { E::load8(v.as_ptr().add(off + d0 + 8 * j)) };
                            for (acc_h, w_h) in acc.iter_mut().zip(&w) {
                                acc_h[j] = _mm256_fmadd_ps(*w_h, vv, acc_h[j]);
                            }
                        }
                    }
                }
                for (h, acc_h) in acc.iter().enumerate() {
                    for (j, a) in acc_h.iter().take(vectors).enumerate() {
                        // SAFETY: `d0 + 8 j + 8 <= hd`; head `h`'s output is `hd` long inside `out`.
                        unsafe { store(out, h * hd + d0 + 8 * j, *a) };
                    }
                }
            }
        }
    };
}

mod avx2 {
    use super::*;
    group_kernels!("avx2,fma,f16c");
}

mod avx512 {
    use super::*;
    group_kernels!("avx2,fma,f16c,avx512f,avx512vl");
}

/// `(first head, heads)` of each pass over `heads` heads, `per` (1 to 3) at a time.
fn passes(heads: usize, per: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..heads).step_by(per).map(move |h| (h, (heads - h).min(per)))
}
