//! AVX-512 matmul micro-kernels (16 f32 lanes, 32 vector registers).
//!
//! Same structure as the AVX2 kernels — tasks walk L2-sized weight sub-blocks, tiles of
//! `M` token rows × `N` weight rows load each vector once — with two differences: the larger
//! register file allows [`MR`] × [`NR`] = 4 × 4 tiles, and the
//! column tail (`k % 16`) is one masked load instead of scalar code.

use std::arch::x86_64::*;

use super::{Prefetcher, ROW_ALIGN, Shape, Task, W_BLOCK_BYTES};
use crate::simd::avx512::tile_sums;
use crate::simd::{Elem, SharedOut};

/// Token rows per tile (prefill).
const MR: usize = 4;
/// Weight rows per tile (prefill).
const NR: usize = 4;

super::define_task!("avx512f,avx512bw,avx512vl", stream_prefetch: true);

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
    tile_sums(&acc)
}

/// `Σ_c x[c] · w[c]` over one weight row, with four independent accumulators.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn dot_row<E: Elem>(x: &[f32], w: &[E]) -> f32 {
    let k = x.len();
    assert_eq!(w.len(), k, "row lengths");
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut c = 0;
    while c + 64 <= k {
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: `c + 16 * j + 16 <= k` for both rows.
            let (wv, xv) = unsafe {
                (
                    E::load16_masked(w.as_ptr().add(c + 16 * j), u16::MAX),
                    f32::load16_masked(x.as_ptr().add(c + 16 * j), u16::MAX),
                )
            };
            *a = _mm512_fmadd_ps(xv, wv, *a);
        }
        c += 64;
    }
    while c < k {
        let left = k - c;
        let mask: u16 = if left >= 16 { u16::MAX } else { (1u16 << left) - 1 };
        // SAFETY: lanes set in `mask` are `c..min(c + 16, k)`, inside both rows.
        let (wv, xv) =
            unsafe { (E::load16_masked(w.as_ptr().add(c), mask), f32::load16_masked(x.as_ptr().add(c), mask)) };
        acc[0] = _mm512_fmadd_ps(xv, wv, acc[0]);
        c += 16;
    }
    let total = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_reduce_add_ps(total)
}
