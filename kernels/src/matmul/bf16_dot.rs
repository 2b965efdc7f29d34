//! Decode-sized matmuls against bf16 weights — and block-quantised ones, dequantised to bf16 in
//! registers (`quantized_bf16`) — with AVX-512 BF16 dot products
//! ([`Isa::Avx512Bf16`](crate::Isa::Avx512Bf16)).
//!
//! The (at most [`MAX_TOKENS`]) token rows are rounded to bf16 once per call, to nearest even.
//! Tasks walk their weight rows in memory order, a tile of a few rows at a time
//! (`rows_per_tile`) against all the task's tokens; the tile, read one 32-value chunk at a time
//! per row, meets every token row through `vdpbf16ps`, which adds 32 products into 16 f32 lanes:
//! twice the multiply rate of f32 FMAs, and no widening of the weights. Each token chunk is
//! loaded once per tile, not once per row: on the test host (AVX-512 at one 512-bit load and one
//! `vdpbf16ps` per cycle) one row per pass reaches 0.72 of the dot products' rate and two rows
//! reach it. Each (row, token) pair has one accumulator taking the chunks in order, and its lanes
//! are summed by one fixed tree, so a token's sum is formed in the same order whatever else is in
//! the batch and whichever rows share its tile; a masked load covers the row's tail.

use std::arch::x86_64::*;

use half::bf16;

use super::prefetch::{Prefetcher, row_ahead};
use super::{Shape, Task};
use crate::simd::SharedOut;
use crate::simd::avx512::{load_bf16, round_bf16_into, tile_sums};

/// Most token rows this path takes (the decode-sized ones); larger matmuls use the f32 tiles.
/// `rows` dispatches on each count up to 8.
pub(super) const MAX_TOKENS: usize = super::DECODE_MAX_TOKENS;
const _: () = assert!(MAX_TOKENS == 8, "bf16_dot::rows has one arm per token count up to 8");

/// How far ahead of a tile its share of the weight stream is prefetched, in bytes (into L2, spread
/// over the tile's chunk steps). A tile of several rows reads them side by side, which the
/// hardware prefetcher follows poorly: streaming SmolLM2-135M's layer matrices at 8 tokens, tiles
/// without this ran 1.35–1.9 times slower than one row at a time, and with it 0.78–0.93 times.
const TILE_AHEAD_BYTES: usize = 4096;
/// Token rows from which that prefetch is issued: a lone token's tile is one row, a linear stream
/// the hardware prefetcher keeps ahead of on its own (there the software prefetch was slower).
const PREFETCH_FROM_TOKENS: usize = 2;

/// `x` rounded to bf16 (nearest even), as raw bits.
///
/// # Safety
/// The CPU must have the module's features.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c")]
pub(super) unsafe fn round(x: &[f32]) -> Vec<u16> {
    let mut out = vec![0u16; x.len()];
    // SAFETY: the caller's contract.
    unsafe { round_bf16_into(x, &mut out) };
    out
}

/// A weight row as the dot products read it: 32 bf16 values at a time.
pub(super) trait Bf16Row: Copy {
    /// Values in the row.
    fn len(&self) -> usize;
    /// The 32 values from `c` (a multiple of 32) on; `mask` has a bit for each of them inside
    /// the row, and the others must come out zero.
    ///
    /// # Safety
    /// The CPU must have the module's features; `c < self.len()`.
    unsafe fn chunk(self, c: usize, mask: u32) -> __m512bh;
    /// Where value `c` is stored (for prefetching; may point past the row: `addr(len)` is where
    /// the next row starts).
    fn addr(self, c: usize) -> *const u8;
}

impl Bf16Row for &[bf16] {
    fn len(&self) -> usize {
        <[bf16]>::len(self)
    }

    #[inline]
    unsafe fn chunk(self, c: usize, mask: u32) -> __m512bh {
        // SAFETY: the masked-in values are `c..min(c + 32, len)`, inside the row; the caller
        // guarantees the features.
        unsafe { load_bf16(self.as_ptr().cast::<u16>().add(c), mask) }
    }

    fn addr(self, c: usize) -> *const u8 {
        self.as_ptr().wrapping_add(c).cast()
    }
}

/// Weight rows multiplied together for `T` token rows. One or two tokens are bound by memory, and
/// one row at a time reads a single linear stream, which streams fastest. With more, several rows
/// share each token chunk's load (one row per pass is bound by the loads before the dot products),
/// as many as keep every (row, token) accumulator, the rows' chunks and one token chunk in the 32
/// vector registers. Streaming SmolLM2-135M's layer matrices against one row at a time: 0.78–0.91
/// of the time at 3 and 4 tokens, 0.85–0.93 at 8. 24 (`ROW_ALIGN`) is a multiple of each, so whole
/// tasks need no tail.
const fn rows_per_tile(t: usize) -> usize {
    match t {
        1..=2 => 1,
        3..=4 => 2,
        _ => 3,
    }
}

/// The task's weight rows (`row(r)`) in memory order (one linear stream per thread), each
/// against all of the task's token rows.
///
/// # Safety
/// The CPU must have the module's features; no other thread touches the task's `out` entries.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c")]
pub(super) unsafe fn rows<R: Bf16Row>(xb: &[u16], row: impl Fn(usize) -> R, s: Shape, t: Task, out: &SharedOut) {
    // SAFETY (every arm): the caller's contract.
    unsafe {
        match t.i1 - t.i0 {
            1 => rows_of::<R, 1, { rows_per_tile(1) }>(xb, row, s, t, out),
            2 => rows_of::<R, 2, { rows_per_tile(2) }>(xb, row, s, t, out),
            3 => rows_of::<R, 3, { rows_per_tile(3) }>(xb, row, s, t, out),
            4 => rows_of::<R, 4, { rows_per_tile(4) }>(xb, row, s, t, out),
            5 => rows_of::<R, 5, { rows_per_tile(5) }>(xb, row, s, t, out),
            6 => rows_of::<R, 6, { rows_per_tile(6) }>(xb, row, s, t, out),
            7 => rows_of::<R, 7, { rows_per_tile(7) }>(xb, row, s, t, out),
            _ => rows_of::<R, 8, { rows_per_tile(8) }>(xb, row, s, t, out),
        }
    }
}

/// [`rows`] for exactly `T` token rows, `N` weight rows at a time (the task's last rows one at a
/// time).
///
/// # Safety
/// As for [`rows`]; also `t.i1 - t.i0 == T`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c")]
unsafe fn rows_of<R: Bf16Row, const T: usize, const N: usize>(
    xb: &[u16],
    row: impl Fn(usize) -> R,
    s: Shape,
    t: Task,
    out: &SharedOut,
) {
    let k = s.k;
    let xs: [&[u16]; T] = std::array::from_fn(|a| &xb[(t.i0 + a) * k..(t.i0 + a + 1) * k]);
    let end = row(s.n - 1).addr(k);
    let write = |r: usize, sums: &[f32]| {
        for (a, v) in sums.iter().enumerate() {
            // SAFETY: (t.i0 + a, r) lies in this task's rectangle.
            unsafe { out.write((t.i0 + a) * s.n + r, *v) };
        }
    };
    // The weight bytes of rows `first..first + rows`, lying `TILE_AHEAD_BYTES` on: what a tile
    // prefetches over its `k / 32` chunk steps.
    let ahead = |first: usize, rows: usize| {
        let (start, stop) = (row(first).addr(0), row(first + rows - 1).addr(k));
        Prefetcher::span(start.wrapping_add(TILE_AHEAD_BYTES), stop as usize - start as usize, end, k.div_ceil(32))
    };
    let mut r = t.r0;
    while r + N <= t.r1 {
        let ws: [R; N] = std::array::from_fn(|j| row(r + j));
        for w in ws {
            row_ahead(w.addr(0), end);
        }
        for (j, sums) in dot(xs, ws, &mut ahead(r, N)).iter().enumerate() {
            write(r + j, sums);
        }
        r += N;
    }
    for r in r..t.r1 {
        row_ahead(row(r).addr(0), end);
        write(r, &dot(xs, [row(r)], &mut ahead(r, 1))[0]);
    }
}

/// `out[j][a] = Σ_c xs[a][c] · ws[j][c]` with f32 accumulation of bf16 products: one accumulator
/// per (row, token) pair, taking the 32-value chunks in order, then [`tile_sums`]; `ahead` steps
/// once per chunk (from [`PREFETCH_FROM_TOKENS`] tokens on). None of it depends on `T` or `N`, so
/// a token's sum is the same whatever else is in the batch and whichever rows share the tile.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c")]
#[inline]
fn dot<R: Bf16Row, const T: usize, const N: usize>(
    xs: [&[u16]; T],
    ws: [R; N],
    ahead: &mut Prefetcher,
) -> [[f32; T]; N] {
    let k = ws[0].len();
    assert!(xs.iter().all(|x| x.len() == k) && ws.iter().all(|w| w.len() == k), "row lengths");
    let mut acc = [[_mm512_setzero_ps(); T]; N];
    let mut step = |c: usize, mask: u32, acc: &mut [[__m512; T]; N]| {
        if T >= PREFETCH_FROM_TOKENS {
            ahead.step();
        }
        // SAFETY (both reads): `c < k`, and the masked-in elements are `c..min(c + 32, k)`,
        // inside the rows.
        let wv: [__m512bh; N] = std::array::from_fn(|j| unsafe { ws[j].chunk(c, mask) });
        for (a, x) in xs.iter().enumerate() {
            let xv = unsafe { load_bf16(x.as_ptr().add(c), mask) };
            for (acc, w) in acc.iter_mut().zip(wv) {
                acc[a] = _mm512_dpbf16_ps(acc[a], xv, w);
            }
        }
    };
    // Whole chunks with a constant mask, so that the loads compile unmasked (masked loads of
    // 16-bit lanes are slower on the test host); then the row's tail.
    let mut c = 0;
    while c + 32 <= k {
        step(c, u32::MAX, &mut acc);
        c += 32;
    }
    if c < k {
        step(c, (1u32 << (k - c)) - 1, &mut acc);
    }
    tile_sums(&acc)
}
