//! AVX-512 prefill GEMM over packed weight panels, for cores with full-width 512-bit FMA units.
//!
//! The dot-product tiles (`avx512`) load a token vector and a weight vector per pair of FMAs
//! and reduce every accumulator across its lanes at the end of each row; at prefill sizes that
//! is bound by L2 traffic and the reductions, not by the FMA units. Here instead a task's weight
//! rows are taken [`GROUP`] at a time and packed (widened to f32 and transposed, 16 × 16 values
//! at a time) into this thread's buffer, column by column: for every column `c` the group's
//! [`PANELS`] panels of 16 rows lie side by side, one row per lane. A micro-tile of up to
//! [`TOKENS`] token rows then walks the columns in order: per column, three weight vectors and
//! one broadcast token value per token row feed `TOKENS × PANELS` FMAs into accumulators whose
//! lanes are distinct output rows, so nothing is reduced across lanes and 16 outputs are stored
//! with one (masked) vector store.
//!
//! Rows are cut into blocks of at most [`KC`] columns so that the packed block stays in cache; a
//! block after the first resumes from the outputs the previous one stored.
//!
//! **Numerics.** Every output `y[i][r]` is one chain of FMAs over the columns in order from
//! zero — the reference's sequential sum, with each product fused into its add — so results do
//! not depend on the batch, the tiling, or which rows share a group. Rows past the task's end
//! are packed as zeros and never stored.

use std::arch::x86_64::*;
use std::cell::RefCell;

use super::{Shape, Task};
use crate::simd::{Elem, SharedOut};

/// f32 lanes per vector (rows per panel).
const LANES: usize = 16;
/// Panels of a group, side by side in the packed buffer.
const PANELS: usize = 3;
/// Weight rows packed and multiplied together.
const GROUP: usize = PANELS * LANES;
/// Most token rows per micro-tile: `TOKENS × PANELS` accumulators plus the three weight vectors
/// and a broadcast fit the 32 vector registers.
const TOKENS: usize = 8;
/// Most columns per block: a packed block (`GROUP × KC` f32, 48 KiB) stays in L2 and a
/// micro-tile's token rows (`TOKENS × KC` f32, 8 KiB) in L1 while every micro-tile of the task
/// walks them. On an Ice Lake host (bf16 weights of SmolLM2-135M's shapes, 128 tokens, 2 threads,
/// alternating) 256 gave 0.58–0.65 of the FMA peak; 128, 576 and whole rows 0.46–0.61,
/// 0.50–0.60 and 0.43–0.69.
const KC: usize = 256;

thread_local! {
    /// This thread's packed weight block (`KC × GROUP` f32 at most).
    static PACKED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs task `t` against weight rows `w`, where row `r` is `w[(r - base) * k..]`.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VL; `base <= t.r0`; no other thread may touch the
/// task's `out` entries while it runs.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn rows<E: Elem>(x: &[f32], w: &[E], base: usize, s: Shape, t: Task, out: &SharedOut) {
    let k = s.k;
    assert!(base <= t.r0 && (t.r1 - base) * k <= w.len(), "weight rows of the task");
    assert!(t.i1 * k <= x.len(), "token rows of the task");
    let blocks = k.div_ceil(KC).max(1);
    PACKED.with_borrow_mut(|buf| {
        buf.resize(k.div_ceil(blocks) * GROUP, 0.0);
        let mut r = t.r0;
        while r < t.r1 {
            let rows = (t.r1 - r).min(GROUP);
            for b in 0..blocks {
                let cols = b * k / blocks..(b + 1) * k / blocks;
                // SAFETY (both): this function's features; rows `r..r + rows` lie in `w` and
                // the task (asserted above), and `buf` holds `cols.len() × GROUP` values.
                unsafe { pack(&w[(r - base) * k..(r + rows - base) * k], k, rows, cols.clone(), buf) };
                let tile = Tile { x, k, n: s.n, r, rows, cols, resume: b > 0 };
                let mut i = t.i0;
                while i < t.i1 {
                    let m = (t.i1 - i).min(TOKENS);
                    // SAFETY: tokens `i..i + m` are in the task; the rest as above.
                    unsafe {
                        match m {
                            8 => tile.run::<8>(i, buf, out),
                            7 => tile.run::<7>(i, buf, out),
                            6 => tile.run::<6>(i, buf, out),
                            5 => tile.run::<5>(i, buf, out),
                            4 => tile.run::<4>(i, buf, out),
                            3 => tile.run::<3>(i, buf, out),
                            2 => tile.run::<2>(i, buf, out),
                            _ => tile.run::<1>(i, buf, out),
                        }
                    }
                    i += m;
                }
            }
            r += rows;
        }
    });
}

/// Packs columns `cols` of the `rows` (≤ [`GROUP`]) weight rows in `w` (each `k` long) into
/// `buf`: column `c`'s panel `p` is the 16 values at `((c - cols.start) · PANELS + p) · 16`,
/// lane `j` from row `16p + j`, zero where that row does not exist.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack<E: Elem>(w: &[E], k: usize, rows: usize, cols: std::ops::Range<usize>, buf: &mut [f32]) {
    assert!(rows <= GROUP && w.len() == rows * k && cols.end <= k, "packing bounds");
    assert!(buf.len() >= cols.len() * GROUP, "packing buffer");
    for p in 0..PANELS {
        let first = p * LANES;
        let count = rows.saturating_sub(first).min(LANES);
        let mut c = cols.start;
        while c < cols.end {
            let width = (cols.end - c).min(LANES);
            let mask = if width == LANES { u16::MAX } else { (1u16 << width) - 1 };
            let block: [__m512; LANES] = std::array::from_fn(|j| {
                if j < count {
                    // SAFETY: row `first + j` exists, and the masked lanes are its columns
                    // `c..c + width`, inside the row (`c + width <= cols.end <= k`).
                    unsafe { E::load16_masked(w.as_ptr().add((first + j) * k + c), mask) }
                } else {
                    _mm512_setzero_ps()
                }
            });
            for (q, column) in transpose(block).iter().enumerate().take(width) {
                let at = ((c + q - cols.start) * PANELS + p) * LANES;
                // SAFETY: `c + q < cols.end`, so `at + 16 <= cols.len() × GROUP <= buf.len()`.
                unsafe { _mm512_storeu_ps(buf.as_mut_ptr().add(at), *column) };
            }
            c += width;
        }
    }
}

/// The 16 × 16 transpose: lane `i` of output `j` is lane `j` of input `i`.
#[target_feature(enable = "avx512f")]
#[inline]
fn transpose(r: [__m512; LANES]) -> [__m512; LANES] {
    // Within each 128-bit block: pairs of rows interleaved 32 bits at a time, then 64.
    let a: [__m512; LANES] = std::array::from_fn(|j| {
        let (lo, hi) = (r[j & !1], r[j | 1]);
        if j % 2 == 0 { _mm512_unpacklo_ps(lo, hi) } else { _mm512_unpackhi_ps(lo, hi) }
    });
    // `b[4g + q]`'s 128-bit block `l` holds rows `4g..4g + 4` of column `4l + q`.
    let b: [__m512; LANES] = std::array::from_fn(|j| {
        let (g, q) = (j / 4, j % 4);
        let (lo, hi) = (_mm512_castps_pd(a[4 * g + q / 2]), _mm512_castps_pd(a[4 * g + 2 + q / 2]));
        _mm512_castpd_ps(if q % 2 == 0 { _mm512_unpacklo_pd(lo, hi) } else { _mm512_unpackhi_pd(lo, hi) })
    });
    // Then a 4 × 4 transpose of 128-bit blocks among `b[q], b[4 + q], b[8 + q], b[12 + q]`.
    let mut out = [_mm512_setzero_ps(); LANES];
    for q in 0..4 {
        let c0 = _mm512_shuffle_f32x4::<0x44>(b[q], b[4 + q]);
        let c1 = _mm512_shuffle_f32x4::<0xEE>(b[q], b[4 + q]);
        let c2 = _mm512_shuffle_f32x4::<0x44>(b[8 + q], b[12 + q]);
        let c3 = _mm512_shuffle_f32x4::<0xEE>(b[8 + q], b[12 + q]);
        out[q] = _mm512_shuffle_f32x4::<0x88>(c0, c2);
        out[4 + q] = _mm512_shuffle_f32x4::<0xDD>(c0, c2);
        out[8 + q] = _mm512_shuffle_f32x4::<0x88>(c1, c3);
        out[12 + q] = _mm512_shuffle_f32x4::<0xDD>(c1, c3);
    }
    out
}

/// One packed group and column block, for the micro-tiles of its token rows.
struct Tile<'a> {
    x: &'a [f32],
    k: usize,
    n: usize,
    /// First weight row of the group.
    r: usize,
    /// Rows in the group (≤ [`GROUP`]).
    rows: usize,
    cols: std::ops::Range<usize>,
    /// Whether to continue from the sums an earlier column block stored.
    resume: bool,
}

impl Tile<'_> {
    /// Token rows `i..i + M` against the packed group: stores (or, resuming, updates) their
    /// outputs for the group's rows.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F; `i + M` token rows exist in `x`; `buf` holds this
    /// group's packed block; no other thread touches these outputs.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn run<const M: usize>(&self, i: usize, buf: &[f32], out: &SharedOut) {
        let spans: [[Option<(*mut f32, u16)>; PANELS]; M] = std::array::from_fn(|a| {
            std::array::from_fn(|p| {
                let valid = self.rows.saturating_sub(p * LANES).min(LANES);
                // SAFETY: these `valid` outputs of token `i + a` belong to this task alone.
                (valid > 0).then(|| unsafe {
                    (out.span((i + a) * self.n + self.r + p * LANES, valid), ((1u32 << valid) - 1) as u16)
                })
            })
        });
        let mut acc = [[_mm512_setzero_ps(); PANELS]; M];
        if self.resume {
            for (acc_a, spans_a) in acc.iter_mut().zip(&spans) {
                for (v, span) in acc_a.iter_mut().zip(spans_a) {
                    if let Some((ptr, mask)) = *span {
                        // SAFETY: the span holds the masked-in lanes.
                        *v = unsafe { _mm512_maskz_loadu_ps(mask, ptr) };
                    }
                }
            }
        }
        let width = self.cols.len();
        assert!(buf.len() >= width * GROUP, "packed block");
        let xs = &self.x[i * self.k..(i + M) * self.k];
        let (xp, wp) = (xs.as_ptr().wrapping_add(self.cols.start), buf.as_ptr());
        for c in 0..width {
            // SAFETY: column `c < width` of the packed block, and of each token row
            // (`cols.start + c < k`).
            unsafe {
                let w: [__m512; PANELS] = std::array::from_fn(|p| _mm512_loadu_ps(wp.add((c * PANELS + p) * LANES)));
                for (a, acc_a) in acc.iter_mut().enumerate() {
                    let xa = _mm512_set1_ps(*xp.add(a * self.k + c));
                    for (v, wv) in acc_a.iter_mut().zip(&w) {
                        *v = _mm512_fmadd_ps(xa, *wv, *v);
                    }
                }
            }
        }
        for (acc_a, spans_a) in acc.iter().zip(&spans) {
            for (v, span) in acc_a.iter().zip(spans_a) {
                if let Some((ptr, mask)) = *span {
                    // SAFETY: the span holds the masked-in lanes.
                    unsafe { _mm512_mask_storeu_ps(ptr, mask, *v) };
                }
            }
        }
    }
}
