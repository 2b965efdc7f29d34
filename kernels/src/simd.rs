//! Shared SIMD building blocks: weight element loads, dot products, reductions and `exp`.
//!
//! The portable functions here are written with eight independent lanes so the compiler can
//! vectorise them on any target; [`avx2`] holds the hand-written AVX2+FMA versions. Every
//! function in [`avx2`] is `#[target_feature(enable = "avx2,fma")]`: callers must only reach it
//! when the pool's [`crate::Isa`] is an x86 SIMD one (every such ISA includes AVX2 and FMA),
//! which a [`crate::CpuPool`] guarantees. [`Elem`] also has AVX-512 loads for the matmul.

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;

use half::{bf16, f16};

/// Lane count of the portable accumulators (matches an AVX2 register of f32).
pub(crate) const LANES: usize = 8;

/// An element type the kernels widen to f32: weights (f32, bf16, f16) and KV-cache entries (f32,
/// bf16). Sealed: the kernels' unsafe loads rely on the implementations here.
pub trait Elem: sealed::Sealed + Copy + Send + Sync + 'static {
    /// Widens one element.
    fn to_f32(self) -> f32;

    /// `src` as f32: borrowed when it already is (f32 overrides this), else widened into `buf`
    /// (resized to fit).
    fn widen<'a>(src: &'a [Self], buf: &'a mut Vec<f32>) -> &'a [f32] {
        buf.clear();
        buf.extend(src.iter().map(|&v| Elem::to_f32(v)));
        buf
    }

    /// `src` as bf16 where the elements are bf16 (for kernels that read them directly).
    fn as_bf16(src: &[Self]) -> Option<&[bf16]> {
        let _ = src;
        None
    }
    /// Loads 8 consecutive elements widened to f32.
    ///
    /// # Safety
    /// `p` must be valid for reading 8 elements and the CPU must support AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;

    /// Loads the elements `i < 16` with bit `i` of `mask` set, widened to f32; other lanes are
    /// zero and their memory is not touched.
    ///
    /// # Safety
    /// `p.add(i)` must be valid for reading for every set bit `i` of `mask`, and the CPU must
    /// support AVX-512 F, BW and VL.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16_masked(p: *const Self, mask: u16) -> std::arch::x86_64::__m512;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    fn widen<'a>(src: &'a [Self], _buf: &'a mut Vec<f32>) -> &'a [f32] {
        src
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller guarantees `p` is readable for 8 f32; `loadu` has no alignment need.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn load16_masked(p: *const Self, mask: u16) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller guarantees the masked-in elements are readable; masked-out lanes
        // are neither read nor faulted on.
        unsafe { std::arch::x86_64::_mm512_maskz_loadu_ps(mask, p) }
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // bf16 is the upper half of an f32: widening is a 16-bit shift (NaNs stay NaN).
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }

    fn as_bf16(src: &[Self]) -> Option<&[bf16]> {
        Some(src)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees `p` is readable for 8 bf16 = 16 bytes; `bf16` is
        // `repr(transparent)` over `u16`, and `loadu` has no alignment requirement.
        let raw = unsafe { _mm_loadu_si128(p.cast::<__m128i>()) };
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw)))
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn load16_masked(p: *const Self, mask: u16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees the masked-in elements are readable; masked-out lanes
        // are neither read nor faulted on. `bf16` is `repr(transparent)` over `u16`.
        let raw = unsafe { _mm256_maskz_loadu_epi16(mask, p.cast::<i16>()) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)))
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees `p` is readable for 8 f16 = 16 bytes; `f16` is
        // `repr(transparent)` over `u16`, and `loadu` has no alignment requirement.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p.cast::<__m128i>()) })
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn load16_masked(p: *const Self, mask: u16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees the masked-in elements are readable; masked-out lanes
        // are neither read nor faulted on (they widen from +0.0).
        _mm512_cvtph_ps(unsafe { _mm256_maskz_loadu_epi16(mask, p.cast::<i16>()) })
    }
}

/// Sum of `a[i] * b[i]` over the common length, eight lanes at a time.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    reduce_lanes(acc) + tail
}

/// Sum of squares, eight lanes at a time.
pub(crate) fn sum_sq(a: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = a.chunks_exact(LANES);
    for x in &mut chunks {
        for l in 0..LANES {
            acc[l] += x[l] * x[l];
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|x| x * x).sum();
    reduce_lanes(acc) + tail
}

/// Sum, eight lanes at a time.
pub(crate) fn sum(a: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = a.chunks_exact(LANES);
    for x in &mut chunks {
        for l in 0..LANES {
            acc[l] += x[l];
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
    reduce_lanes(acc) + tail
}

/// Pairwise sum of the lanes (the same tree an AVX2 horizontal sum uses).
#[inline(always)]
fn reduce_lanes(acc: [f32; LANES]) -> f32 {
    let a = [acc[0] + acc[4], acc[1] + acc[5], acc[2] + acc[6], acc[3] + acc[7]];
    (a[0] + a[2]) + (a[1] + a[3])
}

/// Lets parallel tasks write disjoint parts of one output slice.
///
/// Holders must guarantee that no two tasks write the same index and that nobody reads the
/// slice while tasks run; the slice itself stays mutably borrowed for the lifetime `'a`.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut<'a> {
    ptr: *mut f32,
    len: usize,
    _borrow: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: `SharedOut` is only a pointer to a slice that is mutably borrowed for `'a`; the users
// (matmul tasks) write disjoint index sets, so sharing it across threads creates no data race.
unsafe impl Send for SharedOut<'_> {}
// SAFETY: as above — concurrent use is limited to writes of disjoint indices.
unsafe impl Sync for SharedOut<'_> {}

impl<'a> SharedOut<'a> {
    pub(crate) fn new(out: &'a mut [f32]) -> Self {
        SharedOut { ptr: out.as_mut_ptr(), len: out.len(), _borrow: std::marker::PhantomData }
    }

    /// Writes `v` at index `i` (bounds-checked).
    ///
    /// # Safety
    /// No other task may write or read index `i` concurrently.
    #[inline(always)]
    pub(crate) unsafe fn write(&self, i: usize, v: f32) {
        assert!(i < self.len, "SharedOut index {i} out of range {}", self.len);
        // SAFETY: `i < len` so the pointer is in bounds of the borrowed slice; exclusivity of
        // index `i` is the caller's contract.
        unsafe { self.ptr.add(i).write(v) }
    }

    /// A pointer to the `len` entries from index `i` (bounds-checked), for vector loads and
    /// stores of a task's own outputs.
    ///
    /// # Safety
    /// No other task may write or read those entries while the pointer is used.
    #[inline(always)]
    pub(crate) unsafe fn span(&self, i: usize, len: usize) -> *mut f32 {
        assert!(i + len <= self.len, "SharedOut span {i}+{len} out of range {}", self.len);
        // SAFETY: `i + len <= len` so the span is in bounds of the borrowed slice; exclusivity
        // is the caller's contract.
        unsafe { self.ptr.add(i) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_widening_matches_half() {
        for v in [0.0f32, -1.5, 3.140625, 1e-20, -7e30, f32::INFINITY] {
            let b = bf16::from_f32(v);
            assert_eq!(Elem::to_f32(b), b.to_f32());
        }
    }

    #[test]
    fn portable_reductions() {
        let a: Vec<f32> = (0..19).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..19).map(|i| 1.0 - i as f32).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-3);
        let sq: f32 = a.iter().map(|x| x * x).sum();
        assert!((sum_sq(&a) - sq).abs() < 1e-3);
        assert!((sum(&a) - a.iter().sum::<f32>()).abs() < 1e-4);
    }
}
