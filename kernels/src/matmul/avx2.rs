//! AVX2+FMA matmul micro-kernels.
//!
//! A tile computes `MR` token rows × `NR_T` weight rows: per 8 columns it loads (and widens)
//! each weight vector once and each token vector once, then issues `MR * NR_T` FMAs into
//! independent accumulators. Column tails (`k % 8`) are summed in scalar code.

use std::arch::x86_64::*;

use super::{MR, NR, NR_GEMV, ROW_ALIGN, Shape, Task};
use crate::simd::avx2::{hsum, load};
use crate::simd::{Elem, SharedOut};

/// Runs one task.
///
/// # Safety
/// The CPU must support AVX2 and FMA, and no other thread may access the `y` entries of this
/// task's rectangle while it runs.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn task<E: Elem>(x: &[f32], w: &[E], s: Shape, t: Task, out: &SharedOut) {
    // Walk the task's weight rows in sub-blocks that stay in L2 while every token tile of the
    // task streams past them.
    let sub = (W_BLOCK_BYTES / (s.k * std::mem::size_of::<E>())).max(1).next_multiple_of(ROW_ALIGN);
    let mut r0 = t.r0;
    while r0 < t.r1 {
        let r1 = (r0 + sub).min(t.r1);
        // SAFETY: same contract as this function; the sub-block lies inside the task.
        unsafe { sub_block(x, w, s, Task { r0, r1, ..t }, out) };
        r0 = r1;
    }
}

/// Bytes of weight rows a task works on at a time (kept in L2).
const W_BLOCK_BYTES: usize = 256 * 1024;

/// All token rows of `t` against its weight rows.
///
/// # Safety
/// As for [`task`].
#[target_feature(enable = "avx2,fma")]
unsafe fn sub_block<E: Elem>(x: &[f32], w: &[E], s: Shape, t: Task, out: &SharedOut) {
    // SAFETY (every call below): same contract as this function.
    if t.i1 - t.i0 == 1 {
        unsafe { strip::<E, 1, NR_GEMV>(x, w, s, t, t.i0, out) };
        return;
    }
    let mut i = t.i0;
    while i + MR <= t.i1 {
        unsafe { strip::<E, MR, NR>(x, w, s, t, i, out) };
        i += MR;
    }
    match t.i1 - i {
        1 => unsafe { strip::<E, 1, NR>(x, w, s, t, i, out) },
        2 => unsafe { strip::<E, 2, NR>(x, w, s, t, i, out) },
        3 => unsafe { strip::<E, 3, NR>(x, w, s, t, i, out) },
        _ => {}
    }
}

/// Token rows `i..i + M` against all of the task's weight rows, `NR_T` at a time.
///
/// # Safety
/// As for [`task`]; also `i + M <= t.i1`.
#[target_feature(enable = "avx2,fma")]
unsafe fn strip<E: Elem, const M: usize, const NR_T: usize>(
    x: &[f32],
    w: &[E],
    s: Shape,
    t: Task,
    i: usize,
    out: &SharedOut,
) {
    let k = s.k;
    let mut xr: [&[f32]; M] = [&[]; M];
    for (a, row) in xr.iter_mut().enumerate() {
        *row = &x[(i + a) * k..(i + a + 1) * k];
    }
    let mut r = t.r0;
    while r < t.r1 {
        if r + NR_T <= t.r1 {
            let mut wr: [&[E]; NR_T] = [&[]; NR_T];
            for (b, row) in wr.iter_mut().enumerate() {
                *row = &w[(r + b) * k..(r + b + 1) * k];
            }
            let sums = tile(&xr, &wr, k);
            for (a, sa) in sums.iter().enumerate() {
                for (b, v) in sa.iter().enumerate() {
                    // SAFETY: (i + a, r + b) is inside this task's rectangle.
                    unsafe { out.write((i + a) * s.n + r + b, *v) };
                }
            }
            r += NR_T;
        } else {
            let sums = tile(&xr, &[&w[r * k..(r + 1) * k]], k);
            for (a, sa) in sums.iter().enumerate() {
                // SAFETY: (i + a, r) is inside this task's rectangle.
                unsafe { out.write((i + a) * s.n + r, sa[0]) };
            }
            r += 1;
        }
    }
}

/// `sums[a][b] = Σ_c xr[a][c] · wr[b][c]`; every row slice has length `k`.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn tile<E: Elem, const M: usize, const N: usize>(xr: &[&[f32]; M], wr: &[&[E]; N], k: usize) -> [[f32; N]; M] {
    // Lengths are checked once here so the vector loop can load without bounds checks.
    let rows_ok = xr.iter().all(|r| r.len() == k) && wr.iter().all(|r| r.len() == k);
    assert!(rows_ok, "tile rows must have length k");
    let mut acc = [[_mm256_setzero_ps(); N]; M];
    let mut wv = [_mm256_setzero_ps(); N];
    let mut c = 0;
    while c + 8 <= k {
        for (v, row) in wv.iter_mut().zip(wr) {
            // SAFETY: `c + 8 <= k == row.len()`; AVX2 is enabled for this function.
            *v = unsafe { E::load8(row.as_ptr().add(c)) };
        }
        for (acc_a, row) in acc.iter_mut().zip(xr) {
            // SAFETY: `c + 8 <= k == row.len()`.
            let xv = unsafe { load(row, c) };
            for (acc_ab, v) in acc_a.iter_mut().zip(&wv) {
                *acc_ab = _mm256_fmadd_ps(xv, *v, *acc_ab);
            }
        }
        c += 8;
    }
    let mut sums = [[0.0f32; N]; M];
    for ((s_a, acc_a), xa) in sums.iter_mut().zip(&acc).zip(xr) {
        for ((s_ab, acc_ab), wb) in s_a.iter_mut().zip(acc_a).zip(wr) {
            let tail: f32 = xa[c..].iter().zip(&wb[c..]).map(|(p, q)| p * q.to_f32()).sum();
            *s_ab = hsum(*acc_ab) + tail;
        }
    }
    sums
}
