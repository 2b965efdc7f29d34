//! AVX2+FMA building blocks (8 f32 lanes).
//!
//! Every function is `#[target_feature(enable = "avx2,fma")]`; it is only called from code that
//! already runs with those features (other functions here, or kernels dispatched on
//! [`crate::Isa::Avx2Fma`]). Loads are unaligned and stay within the slices passed in.

use std::arch::x86_64::*;

/// Sum of the 8 lanes.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) fn hsum(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps::<1>(v);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// `[hsum(v[0]), …, hsum(v[7])]` in one vector: the 8 horizontal sums reduced together.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) fn reduce8(v: [__m256; 8]) -> __m256 {
    // Pairwise adds within 128-bit halves: after two rounds, lane j of each half of `u0` holds
    // half a sum of v[j] (j < 4), and of `u1` of v[4 + j]; adding the halves finishes them.
    let t0 = _mm256_hadd_ps(v[0], v[1]);
    let t1 = _mm256_hadd_ps(v[2], v[3]);
    let t2 = _mm256_hadd_ps(v[4], v[5]);
    let t3 = _mm256_hadd_ps(v[6], v[7]);
    let u0 = _mm256_hadd_ps(t0, t1);
    let u1 = _mm256_hadd_ps(t2, t3);
    let lo = _mm256_permute2f128_ps::<0x20>(u0, u1);
    let hi = _mm256_permute2f128_ps::<0x31>(u0, u1);
    _mm256_add_ps(lo, hi)
}

/// Maximum of the 8 lanes.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) fn hmax(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps::<1>(v);
    let s = _mm_max_ps(lo, hi);
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_max_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Loads `a[i..i + 8]`.
///
/// # Safety
/// `i + 8 <= a.len()`.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn load(a: &[f32], i: usize) -> __m256 {
    debug_assert!(i + 8 <= a.len());
    // SAFETY: the caller guarantees `i + 8 <= a.len()`.
    unsafe { _mm256_loadu_ps(a.as_ptr().add(i)) }
}

/// Stores `v` to `a[i..i + 8]`.
///
/// # Safety
/// `i + 8 <= a.len()`.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn store(a: &mut [f32], i: usize, v: __m256) {
    debug_assert!(i + 8 <= a.len());
    // SAFETY: the caller guarantees `i + 8 <= a.len()`.
    unsafe { _mm256_storeu_ps(a.as_mut_ptr().add(i), v) }
}

/// Sum of `a[i] * b[i]` over the common length, with four accumulators.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (all loads below): each loop condition guarantees `i + width <= n <= len`.
    while i + 32 <= n {
        for (j, a_j) in acc.iter_mut().enumerate() {
            let o = i + 8 * j;
            *a_j = _mm256_fmadd_ps(unsafe { load(a, o) }, unsafe { load(b, o) }, *a_j);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(unsafe { load(a, i) }, unsafe { load(b, i) }, acc[0]);
        i += 8;
    }
    let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let tail: f32 = a[i..n].iter().zip(&b[i..n]).map(|(x, y)| x * y).sum();
    hsum(v) + tail
}

/// Sum of squares with four accumulators.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) fn sum_sq(a: &[f32]) -> f32 {
    dot(a, a)
}

/// Sum with four accumulators (the bandwidth probe's inner loop).
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) fn sum(a: &[f32]) -> f32 {
    let n = a.len();
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (all loads below): each loop condition guarantees `i + width <= n`.
    while i + 32 <= n {
        for (j, a_j) in acc.iter_mut().enumerate() {
            *a_j = _mm256_add_ps(unsafe { load(a, i + 8 * j) }, *a_j);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_add_ps(unsafe { load(a, i) }, acc[0]);
        i += 8;
    }
    let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    hsum(v) + a[i..].iter().sum::<f32>()
}

/// Lane-wise `e^x` (Cephes polynomial, ~2 ulp for normal results). Inputs are clamped to
/// ±88.38, so the result saturates near `f32::MAX` / the smallest subnormals instead of
/// reaching inf / 0; NaN inputs give unspecified finite values.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) fn exp(x: __m256) -> __m256 {
    let x = _mm256_min_ps(x, _mm256_set1_ps(88.376_26));
    let x = _mm256_max_ps(x, _mm256_set1_ps(-88.376_26));
    // e^x = 2^n * e^r with n = round(x / ln 2), r = x - n ln 2 (ln 2 split in two for accuracy).
    let n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), _mm256_set1_ps(0.5)));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let r2 = _mm256_mul_ps(r, r);
    let p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
    // 2^n via the exponent field. n is in [-127, 128] after the clamp, which one biased exponent
    // cannot hold, so scale by 2^(n/2) and 2^(n - n/2), each a normal float.
    let ni = _mm256_cvtps_epi32(n);
    let half_n = _mm256_srai_epi32::<1>(ni);
    let pow_a = _mm256_slli_epi32::<23>(_mm256_add_epi32(half_n, _mm256_set1_epi32(127)));
    let pow_b = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_sub_epi32(ni, half_n), _mm256_set1_epi32(127)));
    _mm256_mul_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(pow_a)), _mm256_castsi256_ps(pow_b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn avx2() -> bool {
        crate::Isa::Avx2Fma.is_supported()
    }

    #[test]
    fn exp_matches_std() {
        if !avx2() {
            return;
        }
        let mut worst = 0.0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let xs = [x, x + 0.013, x + 0.027, x + 0.041, x + 0.055, x + 0.069, x + 0.083, x + 0.097];
            let mut out = [0.0f32; 8];
            // SAFETY: AVX2 is supported (checked above); both arrays hold 8 floats.
            unsafe {
                let v = exp(load(&xs, 0));
                store(&mut out, 0, v);
            }
            for (o, xv) in out.iter().zip(xs) {
                let want = xv.exp();
                let rel = ((o - want) / want).abs();
                worst = worst.max(rel);
            }
            x += 0.1;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
    }

    #[test]
    fn reductions_match_scalar() {
        if !avx2() {
            return;
        }
        for n in [0usize, 1, 7, 8, 9, 31, 32, 33, 100] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let d: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            let s: f32 = a.iter().sum();
            let m = a.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            // SAFETY: AVX2 is supported (checked above).
            let (fd, fs) = unsafe { (dot(&a, &b), sum(&a)) };
            assert!((fd - d).abs() < 1e-4, "dot n={n}");
            assert!((fs - s).abs() < 1e-4, "sum n={n}");
            if n >= 8 {
                // SAFETY: AVX2 is supported and `a` holds at least 8 floats.
                let fm = unsafe { hmax(_mm256_max_ps(load(&a, 0), load(&a, n - 8))) };
                assert!(fm <= m && fm >= a[..8].iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)));
            }
        }
    }

    #[test]
    fn reduce8_sums_each_vector() {
        if !avx2() {
            return;
        }
        let rows: Vec<[f32; 8]> = (0..8).map(|r| std::array::from_fn(|l| ((r * 8 + l) as f32 * 0.73).sin())).collect();
        // SAFETY: AVX2 is supported (checked above); each row holds 8 floats.
        let got = unsafe {
            let v = std::array::from_fn(|r| _mm256_loadu_ps(rows[r].as_ptr()));
            let mut out = [0.0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), reduce8(v));
            out
        };
        for (r, row) in rows.iter().enumerate() {
            let want: f32 = row.iter().sum();
            assert!((got[r] - want).abs() < 1e-5, "row {r}: {} vs {want}", got[r]);
        }
    }
}
