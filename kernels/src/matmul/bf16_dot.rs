//! Decode-sized matmuls against bf16 weights with AVX-512 BF16 dot products
//! ([`Isa::Avx512Bf16`](crate::Isa::Avx512Bf16)).
//!
//! The (at most [`MAX_TOKENS`]) token rows are rounded to bf16 once per call, to nearest even.
//! Tasks walk their weight rows in memory order — one linear stream per thread, as the f32 GEMV
//! does — and each row, loaded one cache line (32 values) at a time, meets every token row through
//! `vdpbf16ps`, which adds 32 products into 16 f32 lanes: twice the multiply rate of f32 FMAs, and
//! no widening of the weights. Each token row has two accumulators that alternate over 32-value
//! chunks, so a token's sum is formed in the same order whatever else is in the batch; a masked
//! load covers the row's tail.

use std::arch::x86_64::*;

use half::bf16;

use super::{Plan, Shape, Task};
use crate::pool::CpuPool;
use crate::simd::SharedOut;

/// Most token rows this path takes (the decode-sized ones); larger matmuls use the f32 tiles.
/// `rows` dispatches on each count up to 8.
pub(super) const MAX_TOKENS: usize = super::DECODE_MAX_TOKENS;
const _: () = assert!(MAX_TOKENS == 8, "bf16_dot::rows has one arm per token count up to 8");

/// `y = x · wᵀ` for `s.m <= MAX_TOKENS` token rows.
///
/// The caller guarantees that the pool's ISA is `Avx512Bf16` (so the CPU has these features).
pub(super) fn run(pool: &CpuPool, x: &[f32], w: &[bf16], s: Shape, y: &mut [f32]) {
    assert!(s.m <= MAX_TOKENS, "bf16_dot takes at most {MAX_TOKENS} token rows");
    // SAFETY: the pool's ISA (checked by the caller) includes every feature `round` needs.
    let xb = unsafe { round(x) };
    let plan = Plan::new(s, pool.threads());
    let out = SharedOut::new(y);
    pool.run(plan.tasks(), |t| {
        // SAFETY: as above; tasks write disjoint rectangles of `out`, which nobody reads until
        // `run` returns.
        unsafe { rows(&xb, w, s, plan.task(t, s), &out) };
    });
}

/// `x` rounded to bf16 (nearest even), as raw bits.
///
/// # Safety
/// The CPU must have the module's features.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn round(x: &[f32]) -> Vec<u16> {
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

/// The task's weight rows in memory order against its token rows.
///
/// # Safety
/// The CPU must have the module's features; no other thread touches the task's `out` entries.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn rows(xb: &[u16], w: &[bf16], s: Shape, t: Task, out: &SharedOut) {
    let k = s.k;
    let tok = |i: usize| &xb[i * k..(i + 1) * k];
    let i = t.i0;
    for r in t.r0..t.r1 {
        let row = &w[r * k..(r + 1) * k];
        let mut sums = [0.0f32; MAX_TOKENS];
        let m = t.i1 - t.i0;
        let put = |sums: &mut [f32; MAX_TOKENS], v: &[f32]| sums[..v.len()].copy_from_slice(v);
        match m {
            1 => put(&mut sums, &dot([tok(i)], row)),
            2 => put(&mut sums, &dot([tok(i), tok(i + 1)], row)),
            3 => put(&mut sums, &dot([tok(i), tok(i + 1), tok(i + 2)], row)),
            4 => put(&mut sums, &dot(std::array::from_fn::<_, 4, _>(|a| tok(i + a)), row)),
            5 => put(&mut sums, &dot(std::array::from_fn::<_, 5, _>(|a| tok(i + a)), row)),
            6 => put(&mut sums, &dot(std::array::from_fn::<_, 6, _>(|a| tok(i + a)), row)),
            7 => put(&mut sums, &dot(std::array::from_fn::<_, 7, _>(|a| tok(i + a)), row)),
            _ => put(&mut sums, &dot(std::array::from_fn::<_, 8, _>(|a| tok(i + a)), row)),
        }
        for (a, v) in sums.iter().take(m).enumerate() {
            // SAFETY: (i + a, r) lies in this task's rectangle.
            unsafe { out.write((i + a) * s.n + r, *v) };
        }
    }
}

/// Loads the 32 bf16 values at `p` whose bits are set in `mask` (others are zero).
///
/// # Safety
/// Every masked-in element must be readable.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
unsafe fn load32(p: *const u16, mask: u32) -> __m512bh {
    // SAFETY: the caller guarantees the masked-in elements are readable; bf16 pairs and 16-bit
    // integers have the same layout.
    unsafe { std::mem::transmute(_mm512_maskz_loadu_epi16(mask, p.cast())) }
}

/// `out[a] = Σ_c xs[a][c] · w[c]` with f32 accumulation of bf16 products.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
fn dot<const M: usize>(xs: [&[u16]; M], w: &[bf16]) -> [f32; M] {
    let k = w.len();
    assert!(xs.iter().all(|x| x.len() == k), "row lengths");
    let wp = w.as_ptr().cast::<u16>();
    let mut acc0 = [_mm512_setzero_ps(); M];
    let mut acc1 = [_mm512_setzero_ps(); M];
    let mut c = 0;
    while c + 64 <= k {
        // SAFETY (all loads here): `c + 64 <= k`, the length of every row.
        let (w0, w1) = unsafe { (load32(wp.add(c), u32::MAX), load32(wp.add(c + 32), u32::MAX)) };
        for a in 0..M {
            let xp = xs[a].as_ptr();
            let (x0, x1) = unsafe { (load32(xp.add(c), u32::MAX), load32(xp.add(c + 32), u32::MAX)) };
            acc0[a] = _mm512_dpbf16_ps(acc0[a], x0, w0);
            acc1[a] = _mm512_dpbf16_ps(acc1[a], x1, w1);
        }
        c += 64;
    }
    while c < k {
        let left = k - c;
        let mask: u32 = if left >= 32 { u32::MAX } else { (1u32 << left) - 1 };
        // SAFETY (both loads): the masked-in elements are `c..min(c + 32, k)`, inside the rows.
        let wv = unsafe { load32(wp.add(c), mask) };
        for a in 0..M {
            let xv = unsafe { load32(xs[a].as_ptr().add(c), mask) };
            acc0[a] = _mm512_dpbf16_ps(acc0[a], xv, wv);
        }
        c += 32;
    }
    std::array::from_fn(|a| _mm512_reduce_add_ps(_mm512_add_ps(acc0[a], acc1[a])))
}
