//! AVX-512 matmul micro-kernels (16 f32 lanes, 32 vector registers).
//!
//! Same structure as the AVX2 kernels — tasks walk L2-sized weight sub-blocks, tiles of
//! `M` token rows × `N` weight rows load each vector once — with two differences: the larger
//! register file allows [`MR`] × [`NR`] = 4 × 4 tiles (1 × [`NR_GEMV`] for decode), and the
//! column tail (`k % 16`) is one masked load instead of scalar code.

use std::arch::x86_64::*;

use super::{ROW_ALIGN, Shape, Task};
use crate::simd::{Elem, SharedOut};

/// Token rows per tile (prefill).
const MR: usize = 4;
/// Weight rows per tile (prefill).
const NR: usize = 4;
/// Weight rows per tile when the task has one token (decode).
const NR_GEMV: usize = 8;
/// Bytes of weight rows a task works on at a time (kept in L2).
const W_BLOCK_BYTES: usize = 256 * 1024;

/// Runs one task.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VL, and no other thread may access the `y` entries
/// of this task's rectangle while it runs.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn task<E: Elem>(x: &[f32], w: &[E], s: Shape, t: Task, out: &SharedOut) {
    let sub = (W_BLOCK_BYTES / (s.k * std::mem::size_of::<E>())).max(1).next_multiple_of(ROW_ALIGN);
    let mut r0 = t.r0;
    while r0 < t.r1 {
        let r1 = (r0 + sub).min(t.r1);
        // SAFETY: same contract as this function; the sub-block lies inside the task.
        unsafe { sub_block(x, w, s, Task { r0, r1, ..t }, out) };
        r0 = r1;
    }
}

/// All token rows of `t` against its weight rows.
///
/// # Safety
/// As for [`task`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
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

/// Token rows `i..i + M` against all of the task's weight rows, `N` at a time.
///
/// # Safety
/// As for [`task`]; also `i + M <= t.i1`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn strip<E: Elem, const M: usize, const N: usize>(
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
        if r + N <= t.r1 {
            let mut wr: [&[E]; N] = [&[]; N];
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
            r += N;
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
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn tile<E: Elem, const M: usize, const N: usize>(xr: &[&[f32]; M], wr: &[&[E]; N], k: usize) -> [[f32; N]; M] {
    // Lengths are checked once here so the vector loop can load without bounds checks.
    let rows_ok = xr.iter().all(|r| r.len() == k) && wr.iter().all(|r| r.len() == k);
    assert!(rows_ok, "tile rows must have length k");
    let mut acc = [[_mm512_setzero_ps(); N]; M];
    let mut wv = [_mm512_setzero_ps(); N];
    let mut c = 0;
    while c < k {
        // Full chunks use every lane; the last partial chunk masks off lanes `>= k - c`.
        let left = k - c;
        let mask: u16 = if left >= 16 { u16::MAX } else { (1u16 << left) - 1 };
        for (v, row) in wv.iter_mut().zip(wr) {
            // SAFETY: lanes set in `mask` are `c..min(c + 16, k)`, inside `row` (length `k`).
            *v = unsafe { E::load16_masked(row.as_ptr().add(c), mask) };
        }
        for (acc_a, row) in acc.iter_mut().zip(xr) {
            // SAFETY: as above, for the token row.
            let xv = unsafe { f32::load16_masked(row.as_ptr().add(c), mask) };
            for (acc_ab, v) in acc_a.iter_mut().zip(&wv) {
                *acc_ab = _mm512_fmadd_ps(xv, *v, *acc_ab);
            }
        }
        c += 16;
    }
    let mut sums = [[0.0f32; N]; M];
    for (s_a, acc_a) in sums.iter_mut().zip(&acc) {
        for (s_ab, acc_ab) in s_a.iter_mut().zip(acc_a) {
            *s_ab = _mm512_reduce_add_ps(*acc_ab);
        }
    }
    sums
}
