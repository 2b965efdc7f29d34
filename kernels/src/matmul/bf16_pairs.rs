//! Decode-sized matmuls (2 to [`MAX_TOKENS`] token rows) against bf16 weights on the AVX-512 ISAs
//! without bf16 dot products ([`Isa::has_wide_f32_tiles`](crate::Isa::has_wide_f32_tiles)): f32
//! FMAs with the weights widened two lanes at a time.
//!
//! A 64-byte load holds 32 bf16 weights, and a bf16 value is the upper half of an f32, so one
//! shift widens the even-indexed 16 of them and one mask the odd-indexed 16: two single-cycle
//! operations per 32 weights, where widening 16 at a time (`vpmovzxwd` and a shift, as the tile
//! kernels do) takes four and a second load. The token rows are split to match once per call
//! ([`split_pairs`]): each 32-column chunk of a row becomes its 16 even-indexed values, then its 16
//! odd-indexed ones, and the row is padded with zeros to whole chunks.
//!
//! Tasks walk their weight rows in memory order, a tile of a few rows at a time against all the
//! task's tokens, so each weight is read once per call and each token vector is loaded once per
//! tile. Each (row, token) pair has one accumulator taking every chunk's even then odd half in
//! order, and its lanes are summed by one fixed tree ([`tile_sums`]), so a token's sum does not
//! depend on the other tokens in the call or on which rows share its tile. As for every matmul
//! path but the reference, sums agree with [`matmul_ref`](super::matmul_ref) to f32 rounding.

use std::arch::x86_64::*;

use half::bf16;

use super::prefetch::{Prefetcher, row_ahead};
use super::{Shape, Task};
use crate::simd::SharedOut;
use crate::simd::avx512::tile_sums;

/// Most token rows this path takes; `rows` dispatches on each count from 2 up to it.
const MAX_TOKENS: usize = super::DECODE_MAX_TOKENS;
const _: () = assert!(MAX_TOKENS == 8, "bf16_pairs::rows has one arm per token count up to 8");

/// Columns per chunk: the bf16 weights in one 64-byte load.
const CHUNK: usize = 32;

/// How far ahead of a tile its share of the weight stream is prefetched, in bytes (into L2, spread
/// over the tile's chunk steps): several rows read side by side are a pattern the hardware
/// prefetcher follows poorly.
const TILE_AHEAD_BYTES: usize = 4096;

/// Weight rows per tile for `t` token rows: as many as keep every (row, token) accumulator, the
/// rows' widened halves and one token vector in the 32 vector registers. A multiple of each
/// divides `ROW_ALIGN` (24), so whole tasks need no tail.
const fn rows_per_tile(t: usize) -> usize {
    if t <= 4 { 4 } else { 3 }
}

/// Length of a split token row of `k` columns: whole chunks.
fn split_len(k: usize) -> usize {
    k.next_multiple_of(CHUNK)
}

/// The `m` token rows of `x` (`k` columns each) split for this path: row `a` is
/// `out[a * split_len(k)..]`, and each of its chunks holds the chunk's even-indexed columns and
/// then its odd-indexed ones, padded with zeros past `k`.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn split_pairs(x: &[f32], m: usize, k: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "token rows");
    let len = split_len(k);
    let mut out = vec![0.0f32; m * len];
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (row, split) in x.chunks_exact(k).zip(out.chunks_exact_mut(len)) {
        for (c, dst) in (0..k).step_by(CHUNK).zip(split.chunks_exact_mut(CHUNK)) {
            let mask = |from: usize| -> u16 {
                let left = k.saturating_sub(c + from);
                if left >= 16 { u16::MAX } else { (1u16 << left) - 1 }
            };
            // SAFETY: the masked-in lanes are the columns `c..min(c + 32, k)`, inside the row;
            // `dst` holds 32 values.
            unsafe {
                let lo = _mm512_maskz_loadu_ps(mask(0), row.as_ptr().add(c));
                let hi = _mm512_maskz_loadu_ps(mask(16), row.as_ptr().wrapping_add(c + 16));
                _mm512_storeu_ps(dst.as_mut_ptr(), _mm512_permutex2var_ps(lo, even, hi));
                _mm512_storeu_ps(dst.as_mut_ptr().add(16), _mm512_permutex2var_ps(lo, odd, hi));
            }
        }
    }
    out
}

/// The task's weight rows (`w` row-major, `s.k` columns) in memory order, each against all of
/// the task's token rows (`xs`, made by [`split_pairs`]).
///
/// # Safety
/// The CPU must have AVX-512 F and BW; `2 <= t.i1 - t.i0 <= MAX_TOKENS`; no other thread
/// touches the task's `out` entries.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn rows(xs: &[f32], w: &[bf16], s: Shape, t: Task, out: &SharedOut) {
    // SAFETY (every arm): the caller's contract.
    unsafe {
        match t.i1 - t.i0 {
            2 => rows_of::<2, { rows_per_tile(2) }>(xs, w, s, t, out),
            3 => rows_of::<3, { rows_per_tile(3) }>(xs, w, s, t, out),
            4 => rows_of::<4, { rows_per_tile(4) }>(xs, w, s, t, out),
            5 => rows_of::<5, { rows_per_tile(5) }>(xs, w, s, t, out),
            6 => rows_of::<6, { rows_per_tile(6) }>(xs, w, s, t, out),
            7 => rows_of::<7, { rows_per_tile(7) }>(xs, w, s, t, out),
            8 => rows_of::<8, { rows_per_tile(8) }>(xs, w, s, t, out),
            n => unreachable!("bf16_pairs takes 2 to {MAX_TOKENS} token rows, not {n}"),
        }
    }
}

/// [`rows`] for exactly `T` token rows, `N` weight rows at a time (the task's last rows one at a
/// time).
///
/// # Safety
/// As for [`rows`]; also `t.i1 - t.i0 == T`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn rows_of<const T: usize, const N: usize>(xs: &[f32], w: &[bf16], s: Shape, t: Task, out: &SharedOut) {
    let (k, len) = (s.k, split_len(s.k));
    let xr: [&[f32]; T] = std::array::from_fn(|a| &xs[(t.i0 + a) * len..(t.i0 + a + 1) * len]);
    let row = |r: usize| &w[r * k..(r + 1) * k];
    let end = w.as_ptr_range().end.cast::<u8>();
    let write = |r: usize, sums: &[f32]| {
        for (a, v) in sums.iter().enumerate() {
            // SAFETY: (t.i0 + a, r) lies in this task's rectangle.
            unsafe { out.write((t.i0 + a) * s.n + r, *v) };
        }
    };
    // The weight bytes of rows `first..first + rows`, lying `TILE_AHEAD_BYTES` on: what a tile
    // prefetches over its chunk steps.
    let ahead = |first: usize, rows: usize| {
        let start = row(first).as_ptr().cast::<u8>();
        Prefetcher::span(start.wrapping_add(TILE_AHEAD_BYTES), rows * k * 2, end, k.div_ceil(CHUNK))
    };
    let mut r = t.r0;
    while r + N <= t.r1 {
        let ws: [&[bf16]; N] = std::array::from_fn(|j| row(r + j));
        for wr in ws {
            row_ahead(wr.as_ptr().cast(), end);
        }
        for (j, sums) in dot(xr, ws, &mut ahead(r, N)).iter().enumerate() {
            write(r + j, sums);
        }
        r += N;
    }
    for r in r..t.r1 {
        row_ahead(row(r).as_ptr().cast(), end);
        write(r, &dot(xr, [row(r)], &mut ahead(r, 1))[0]);
    }
}

/// `out[j][a] = Σ_c xs[a][c] · ws[j][c]` in f32: one accumulator per (row, token) pair, taking
/// each chunk's even half then its odd half, in chunk order, then [`tile_sums`]; `ahead` steps
/// once per chunk.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn dot<const T: usize, const N: usize>(xs: [&[f32]; T], ws: [&[bf16]; N], ahead: &mut Prefetcher) -> [[f32; T]; N] {
    let k = ws[0].len();
    let len = split_len(k);
    assert!(xs.iter().all(|x| x.len() == len) && ws.iter().all(|w| w.len() == k), "row lengths");
    let upper = _mm512_set1_epi32(0xFFFF_0000_u32 as i32);
    let mut acc = [[_mm512_setzero_ps(); T]; N];
    let mut step = |c: usize, mask: u32, acc: &mut [[__m512; T]; N]| {
        ahead.step();
        // SAFETY: the masked-in weights are `c..min(c + 32, k)`, inside the rows.
        let raw: [__m512i; N] =
            std::array::from_fn(|j| unsafe { _mm512_maskz_loadu_epi16(mask, ws[j].as_ptr().add(c).cast()) });
        let even: [__m512; N] = std::array::from_fn(|j| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(raw[j])));
        let odd: [__m512; N] = std::array::from_fn(|j| _mm512_castsi512_ps(_mm512_and_si512(raw[j], upper)));
        for (a, x) in xs.iter().enumerate() {
            // SAFETY: `c + 32 <= len`, the split row's length.
            let (xe, xo) = unsafe { (_mm512_loadu_ps(x.as_ptr().add(c)), _mm512_loadu_ps(x.as_ptr().add(c + 16))) };
            for (acc, v) in acc.iter_mut().zip(even) {
                acc[a] = _mm512_fmadd_ps(xe, v, acc[a]);
            }
            for (acc, v) in acc.iter_mut().zip(odd) {
                acc[a] = _mm512_fmadd_ps(xo, v, acc[a]);
            }
        }
    };
    // Whole chunks with a constant mask, so that the weight loads compile unmasked; then the
    // row's tail (its split token values past `k` are zero).
    let mut c = 0;
    while c + CHUNK <= k {
        step(c, u32::MAX, &mut acc);
        c += CHUNK;
    }
    if c < k {
        step(c, (1u32 << (k - c)) - 1, &mut acc);
    }
    tile_sums(&acc)
}
