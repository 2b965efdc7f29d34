//! AVX2+FMA matmul micro-kernels.
//!
//! A tile computes `M` token rows × `N` weight rows: per 8 columns it loads (and widens) each
//! weight vector once and each token vector once, then issues `M * N` FMAs into independent
//! accumulators. Column tails (`k % 8`) are summed in scalar code. The task and strip drivers
//! around the tile are shared with the AVX-512 module (`define_task!`).

use std::arch::x86_64::*;

use super::{MR, NR, Prefetcher, ROW_ALIGN, Shape, Task, W_BLOCK_BYTES};
use crate::simd::avx2::{hsum, load};
use crate::simd::{Elem, SharedOut};

super::define_task!("avx2,fma,f16c", stream_prefetch: false);

/// `sums[a][b] = Σ_c xr[a][c] · wr[b][c]`; every row slice has length `k`.
#[target_feature(enable = "avx2,fma,f16c")]
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

/// `Σ_c x[c] · w[c]` over one weight row, with four independent accumulators.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn dot_row<E: Elem>(x: &[f32], w: &[E]) -> f32 {
    let k = x.len();
    assert_eq!(w.len(), k, "row lengths");
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut c = 0;
    while c + 32 <= k {
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: `c + 8 * j + 8 <= k` for both rows; AVX2 is enabled for this function.
            let (wv, xv) = unsafe { (E::load8(w.as_ptr().add(c + 8 * j)), load(x, c + 8 * j)) };
            *a = _mm256_fmadd_ps(xv, wv, *a);
        }
        c += 32;
    }
    while c + 8 <= k {
        // SAFETY: `c + 8 <= k`.
        let (wv, xv) = unsafe { (E::load8(w.as_ptr().add(c)), load(x, c)) };
        acc[0] = _mm256_fmadd_ps(xv, wv, acc[0]);
        c += 8;
    }
    let tail: f32 = x[c..].iter().zip(&w[c..]).map(|(p, q)| p * q.to_f32()).sum();
    let total = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    hsum(total) + tail
}
