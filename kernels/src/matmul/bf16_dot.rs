//! Decode-sized matmuls against bf16 weights — and block-quantised ones, dequantised to bf16 in
//! registers (`quantized_bf16`) — with AVX-512 BF16 dot products
//! ([`Isa::Avx512Bf16`](crate::Isa::Avx512Bf16)).
//!
//! The (at most [`MAX_TOKENS`]) token rows are rounded to bf16 once per call, to nearest even.
//! Tasks walk their weight rows in memory order, one row at a time against all the task's
//! tokens; each row, read one cache line (32 values) at a time, meets every token row through
//! `vdpbf16ps`, which adds 32 products into 16 f32 lanes: twice the multiply rate of f32 FMAs,
//! and no widening of the weights. Each (row, token) pair has two accumulators (even and odd
//! chunks) and the lanes are summed by one fixed tree, so a token's sum is formed in the same
//! order whatever else is in the batch; a masked load covers the row's tail.

use std::arch::x86_64::*;

use half::bf16;

use super::prefetch::row_ahead;
use super::{Shape, Task};
use crate::simd::SharedOut;

/// Most token rows this path takes (the decode-sized ones); larger matmuls use the f32 tiles.
/// `rows` dispatches on each count up to 8.
pub(super) const MAX_TOKENS: usize = super::DECODE_MAX_TOKENS;
const _: () = assert!(MAX_TOKENS == 8, "bf16_dot::rows has one arm per token count up to 8");

/// How far ahead of the chunk being multiplied the weight stream is prefetched, in values (2 KiB
/// of bf16, about 1 KiB of Q8_0). With several token rows a row takes long enough that the
/// hardware prefetcher alone leaves the weight loads waiting on memory; one token streams fast
/// enough without it.
const PREFETCH_AHEAD: usize = 1024;
/// Token rows from which the software prefetch is issued.
const PREFETCH_FROM_TOKENS: usize = 2;

/// `x` rounded to bf16 (nearest even), as raw bits.
///
/// # Safety
/// The CPU must have the module's features.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c")]
pub(super) unsafe fn round(x: &[f32]) -> Vec<u16> {
    let mut out = vec![0u16; x.len()];
    for (o, c) in out.chunks_mut(16).zip(x.chunks(16)) {
        let mask: u16 = if c.len() == 16 { u16::MAX } else { (1u16 << c.len()) - 1 };
        // SAFETY: the masked-in lanes are `0..c.len()`, inside both chunks.
        unsafe {
            let v = _mm512_maskz_loadu_ps(mask, c.as_ptr());
            let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
            _mm256_mask_storeu_epi16(o.as_mut_ptr().cast(), mask, b);
        }
    }
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
        unsafe { load32(self.as_ptr().cast::<u16>().add(c), mask) }
    }

    fn addr(self, c: usize) -> *const u8 {
        self.as_ptr().wrapping_add(c).cast()
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
            1 => rows_of::<R, 1>(xb, row, s, t, out),
            2 => rows_of::<R, 2>(xb, row, s, t, out),
            3 => rows_of::<R, 3>(xb, row, s, t, out),
            4 => rows_of::<R, 4>(xb, row, s, t, out),
            5 => rows_of::<R, 5>(xb, row, s, t, out),
            6 => rows_of::<R, 6>(xb, row, s, t, out),
            7 => rows_of::<R, 7>(xb, row, s, t, out),
            _ => rows_of::<R, 8>(xb, row, s, t, out),
        }
    }
}

/// [`rows`] for exactly `T` token rows.
///
/// # Safety
/// As for [`rows`]; also `t.i1 - t.i0 == T`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c")]
unsafe fn rows_of<R: Bf16Row, const T: usize>(
    xb: &[u16],
    row: impl Fn(usize) -> R,
    s: Shape,
    t: Task,
    out: &SharedOut,
) {
    let k = s.k;
    let xs: [&[u16]; T] = std::array::from_fn(|a| &xb[(t.i0 + a) * k..(t.i0 + a + 1) * k]);
    let end = row(s.n - 1).addr(k);
    for r in t.r0..t.r1 {
        row_ahead(row(r).addr(0), end);
        let sums = dot(xs, row(r));
        for (a, v) in sums.iter().enumerate() {
            // SAFETY: (t.i0 + a, r) lies in this task's rectangle.
            unsafe { out.write((t.i0 + a) * s.n + r, *v) };
        }
    }
}

/// Loads the 32 bf16 values at `p` whose bits are set in `mask` (others are zero).
///
/// # Safety
/// Every masked-in element must be readable.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c")]
#[inline]
unsafe fn load32(p: *const u16, mask: u32) -> __m512bh {
    // SAFETY: the caller guarantees the masked-in elements are readable; bf16 pairs and 16-bit
    // integers have the same layout.
    unsafe { std::mem::transmute(_mm512_maskz_loadu_epi16(mask, p.cast())) }
}

/// `out[a] = Σ_c xs[a][c] · w[c]` with f32 accumulation of bf16 products: two accumulators per
/// token (even and odd 32-value chunks, so even one token has two dependency chains), added, then
/// [`reduce`]. None of it depends on `T`, so a token's sum is the same whatever else is in the
/// batch.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c")]
#[inline]
fn dot<R: Bf16Row, const T: usize>(xs: [&[u16]; T], w: R) -> [f32; T] {
    let k = w.len();
    assert!(xs.iter().all(|x| x.len() == k), "row lengths");
    let mut even = [_mm512_setzero_ps(); T];
    let mut odd = [_mm512_setzero_ps(); T];
    let step = |c: usize, mask: u32, acc: &mut [__m512; T]| {
        // SAFETY (both reads): `c < k`, and the masked-in elements are `c..min(c + 32, k)`,
        // inside the rows.
        let wv = unsafe { w.chunk(c, mask) };
        for (a, x) in xs.iter().enumerate() {
            let xv = unsafe { load32(x.as_ptr().add(c), mask) };
            acc[a] = _mm512_dpbf16_ps(acc[a], xv, wv);
        }
    };
    let mut c = 0;
    while c + 64 <= k {
        if T >= PREFETCH_FROM_TOKENS {
            // A hint: addresses past the matrix are harmless (prefetches never fault).
            _mm_prefetch::<_MM_HINT_T0>(w.addr(c + PREFETCH_AHEAD).cast());
            _mm_prefetch::<_MM_HINT_T0>(w.addr(c + PREFETCH_AHEAD + 32).cast());
        }
        step(c, u32::MAX, &mut even);
        step(c + 32, u32::MAX, &mut odd);
        c += 64;
    }
    if c < k {
        let left = k - c;
        step(c, if left >= 32 { u32::MAX } else { (1u32 << left) - 1 }, &mut even);
        if left > 32 {
            step(c + 32, (1u32 << (left - 32)) - 1, &mut odd);
        }
    }
    reduce(std::array::from_fn(|a| _mm512_add_ps(even[a], odd[a])))
}

/// The lane sums of up to 16 vectors through a transposing tree: each level adds every vector's
/// lanes `j` and `j + width / 2` (512 → 256 → 128 → 64 → 32 bits), packing two vectors' halves
/// into one register, so 8 vectors cost 8 shuffle pairs rather than 8 separate reductions. Every
/// input is summed by the same tree whatever the count, and unpaired partners are zero, so a
/// vector's sum does not depend on its neighbours.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c")]
#[inline]
fn reduce<const T: usize>(vs: [__m512; T]) -> [f32; T] {
    const { assert!(T >= 1 && T <= 16, "reduce takes 1 to 16 vectors") };
    let zero = _mm512_setzero_ps();
    let pair = |v: &[__m512], i: usize| (v[2 * i], v.get(2 * i + 1).copied().unwrap_or(zero));
    let mut l1 = [zero; 8];
    for (i, l) in l1.iter_mut().enumerate().take(T.div_ceil(2)) {
        let (a, b) = pair(&vs, i);
        *l = _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(a, b), _mm512_shuffle_f32x4::<0xEE>(a, b));
    }
    let mut l2 = [zero; 4];
    for (i, l) in l2.iter_mut().enumerate().take(T.div_ceil(4)) {
        let (a, b) = pair(&l1[..T.div_ceil(2)], i);
        *l = _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(a, b), _mm512_shuffle_f32x4::<0xDD>(a, b));
    }
    let mut l3 = [zero; 2];
    for (i, l) in l3.iter_mut().enumerate().take(T.div_ceil(8)) {
        let (a, b) = pair(&l2[..T.div_ceil(4)], i);
        *l = _mm512_add_ps(_mm512_shuffle_ps::<0x44>(a, b), _mm512_shuffle_ps::<0xEE>(a, b));
    }
    let (a, b) = pair(&l3[..T.div_ceil(8)], 0);
    let lanes: [f32; 16] =
        // SAFETY: `__m512` and `[f32; 16]` have the same size and every bit pattern is valid.
        unsafe { std::mem::transmute(_mm512_add_ps(_mm512_shuffle_ps::<0x88>(a, b), _mm512_shuffle_ps::<0xDD>(a, b))) };
    // Input `j` ends in lane `4 (j % 4) + j / 4`.
    std::array::from_fn(|j| lanes[4 * (j % 4) + j / 4])
}
