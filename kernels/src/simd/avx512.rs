//! AVX-512 building blocks shared by the kernels (every function needs AVX-512F; callers reach
//! them only on the AVX-512 ISAs, which a [`crate::CpuPool`] guarantees the CPU has).

use std::arch::x86_64::*;

/// Loads the 32 bf16 values (raw bits) at `p` whose bits are set in `mask`; the others are zero.
/// A constant all-ones mask compiles to a plain load.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and BF16; every masked-in element must be readable.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
pub(crate) unsafe fn load_bf16(p: *const u16, mask: u32) -> __m512bh {
    // SAFETY: the caller guarantees the masked-in elements are readable; bf16 pairs and 16-bit
    // integers have the same layout.
    unsafe { std::mem::transmute(_mm512_maskz_loadu_epi16(mask, p.cast())) }
}

/// `out[i] = x[i]` rounded to bf16 (nearest even), as raw bits; `out` is as long as `x`.
///
/// # Safety
/// The CPU must have AVX-512 F, BW, VL and BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(crate) unsafe fn round_bf16_into(x: &[f32], out: &mut [u16]) {
    assert_eq!(x.len(), out.len(), "one bf16 per value");
    for (o, c) in out.chunks_mut(16).zip(x.chunks(16)) {
        let mask: u16 = if c.len() == 16 { u16::MAX } else { (1u16 << c.len()) - 1 };
        // SAFETY: the masked-in lanes are `0..c.len()`, inside both chunks.
        unsafe {
            let v = _mm512_maskz_loadu_ps(mask, c.as_ptr());
            let b = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v));
            _mm256_mask_storeu_epi16(o.as_mut_ptr().cast(), mask, b);
        }
    }
}

/// The lane sums of up to 16 vectors (`out[j]` is the sum of `vs[j]`) through a transposing
/// tree: each level adds every vector's lanes `j` and `j + width / 2` (512 → 256 → 128 → 64 →
/// 32 bits), packing two vectors' halves into one register, so 8 vectors cost 8 shuffle pairs
/// rather than 8 separate reductions. Every input is summed by the same tree whatever the count,
/// and unpaired partners are zero, so a vector's sum does not depend on its neighbours.
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn lane_sums(vs: &[__m512]) -> [f32; 16] {
    let n = vs.len();
    assert!((1..=16).contains(&n), "lane_sums takes 1 to 16 vectors");
    let zero = _mm512_setzero_ps();
    let pair = |v: &[__m512], i: usize| (v[2 * i], v.get(2 * i + 1).copied().unwrap_or(zero));
    let mut l1 = [zero; 8];
    for (i, l) in l1.iter_mut().enumerate().take(n.div_ceil(2)) {
        let (a, b) = pair(vs, i);
        *l = _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(a, b), _mm512_shuffle_f32x4::<0xEE>(a, b));
    }
    let mut l2 = [zero; 4];
    for (i, l) in l2.iter_mut().enumerate().take(n.div_ceil(4)) {
        let (a, b) = pair(&l1[..n.div_ceil(2)], i);
        *l = _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(a, b), _mm512_shuffle_f32x4::<0xDD>(a, b));
    }
    let mut l3 = [zero; 2];
    for (i, l) in l3.iter_mut().enumerate().take(n.div_ceil(8)) {
        let (a, b) = pair(&l2[..n.div_ceil(4)], i);
        *l = _mm512_add_ps(_mm512_shuffle_ps::<0x44>(a, b), _mm512_shuffle_ps::<0xEE>(a, b));
    }
    let (a, b) = pair(&l3[..n.div_ceil(8)], 0);
    let lanes: [f32; 16] =
        // SAFETY: `__m512` and `[f32; 16]` have the same size and every bit pattern is valid.
        unsafe { std::mem::transmute(_mm512_add_ps(_mm512_shuffle_ps::<0x88>(a, b), _mm512_shuffle_ps::<0xDD>(a, b))) };
    // Input `j` ends in lane `4 (j % 4) + j / 4`.
    std::array::from_fn(|j| lanes[4 * (j % 4) + j / 4])
}

/// The lane sums of a tile of accumulators, `out[j][a]` the sum of `acc[j][a]`, through
/// [`lane_sums`] on up to 16 of them at a time in row-major order (every index is a constant
/// once inlined, so the accumulators stay in registers). Each accumulator's sum takes the same
/// tree whatever the tile's shape.
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn tile_sums<const T: usize, const N: usize>(acc: &[[__m512; T]; N]) -> [[f32; T]; N] {
    let mut sums = [[0.0; T]; N];
    let mut base = 0;
    while base < N * T {
        let part: [__m512; 16] = std::array::from_fn(|i| {
            let i = base + i;
            if i < N * T { acc[i / T][i % T] } else { _mm512_setzero_ps() }
        });
        let lanes = lane_sums(&part[..(N * T - base).min(16)]);
        for (i, v) in lanes.iter().enumerate() {
            let i = base + i;
            if i < N * T {
                sums[i / T][i % T] = *v;
            }
        }
        base += 16;
    }
    sums
}
