//! Matmul against block-quantised weights (Q8_0, Q4_0, Q4_1), read in their own format.
//!
//! Tasks are cut as for plain weights ([`super::Plan`]). Within a task:
//! - up to [`DECODE_MAX_TOKENS`] tokens (decode, small batches) on an x86 SIMD path: the rows are
//!   walked in memory order, each row's blocks dequantised in registers and multiplied with the
//!   token rows four at a time with AVX-512VL's registers, two with AVX2's (`quantized_avx2`).
//!   Q8_0 mostly takes integer dot products instead, and on [`Isa::Avx512Bf16`] 2 to 8 tokens
//!   take bf16 dot products for every format; see `path` in `matmul/path.rs`;
//! - more tokens (prefill): an L2-sized group of rows is widened into this thread's buffer, then
//!   the f32 tile kernels run over it, so widening costs one pass per [`TOKENS_PER_TASK`] tokens.
//!
//! Q8_0 in row panels ([`crate::quant::panels`]) comes here only off its integer dot path
//! (`quantized_panels`: exact calls, ISAs without VNNI), and is always widened.
//!
//! No matrix is ever expanded whole: the buffer holds at most [`W_BLOCK_BYTES`] of f32 rows.
//!
//! [`TOKENS_PER_TASK`]: super::TOKENS_PER_TASK
//! [`W_BLOCK_BYTES`]: super::W_BLOCK_BYTES

use std::cell::RefCell;

#[cfg(target_arch = "x86_64")]
use super::DECODE_MAX_TOKENS;
use super::{ROW_ALIGN, Shape, Task, f32_rows};
use crate::isa::Isa;
use crate::quant::{QK, QuantBlock, dequantize_into, panels};
use crate::simd::SharedOut;

/// Bytes of widened f32 rows a task works on at a time.
const WIDEN_BYTES: usize = 256 * 1024;

thread_local! {
    /// This thread's widened rows, reused across tasks and calls.
    static WIDENED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A block format with a register-dequantising kernel on x86.
pub(crate) trait Kernel: QuantBlock {
    /// The block's 32 weights as four 8-lane f32 vectors.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn dequantize8(&self) -> [std::arch::x86_64::__m256; 4];
}

/// One task against block-quantised weights.
///
/// # Safety
/// `isa` must be supported; no other thread touches the task's `out` entries while it runs.
pub(super) unsafe fn task<B: Kernel>(isa: Isa, x: &[f32], w: &[B], s: Shape, t: Task, out: &SharedOut) {
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() && t.i1 - t.i0 <= DECODE_MAX_TOKENS {
        // SAFETY (both arms): the caller's contract; every x86 SIMD ISA includes AVX2, FMA and
        // F16C, the AVX-512 ones also AVX-512F and VL.
        match isa {
            Isa::Avx512 | Isa::Avx512Vnni | Isa::Avx512Bf16 => unsafe { direct_avx512(x, w, s, t, out) },
            _ => unsafe { direct_avx2(x, w, s, t, out) },
        }
        return;
    }
    // SAFETY: the caller's contract.
    unsafe { widened(isa, x, w, s, t, out) };
}

/// [`direct`] with AVX2's 16 registers: token rows two at a time.
///
/// # Safety
/// As for [`direct`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn direct_avx2<B: Kernel>(x: &[f32], w: &[B], s: Shape, t: Task, out: &SharedOut) {
    // SAFETY: the caller's contract.
    unsafe { direct::<B, 2>(x, w, s, t, out) }
}

/// [`direct`] with AVX-512VL's 32 registers: token rows four at a time.
///
/// # Safety
/// As for [`direct`]; the CPU must also have AVX-512F and VL.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
unsafe fn direct_avx512<B: Kernel>(x: &[f32], w: &[B], s: Shape, t: Task, out: &SharedOut) {
    // SAFETY: the caller's contract.
    unsafe { direct::<B, 4>(x, w, s, t, out) }
}

/// Rows in memory order; for each, the task's tokens `G` (2 or 4) at a time. A token's sums do
/// not depend on `G` or on the other tokens.
///
/// # Safety
/// AVX2, FMA and F16C must be available; no other thread touches the task's `out` entries.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn direct<B: Kernel, const G: usize>(x: &[f32], w: &[B], s: Shape, t: Task, out: &SharedOut) {
    use super::quantized_avx2::dot_rows;
    let tok = |i: usize| &x[i * s.k..(i + 1) * s.k];
    // SAFETY: the caller's contract.
    unsafe {
        by_row(w, s, t, G, out, |row, i, n| {
            // The first group of a multi-token task brings the row in; later ones find it cached.
            let pf = i == t.i0 && t.i1 - t.i0 >= 2;
            // SAFETY (every arm): the caller guarantees the CPU features.
            match n {
                1 => pad(dot_rows([tok(i)], row, pf)),
                2 => pad(dot_rows([tok(i), tok(i + 1)], row, pf)),
                3 => pad(dot_rows([tok(i), tok(i + 1), tok(i + 2)], row, pf)),
                _ => dot_rows([tok(i), tok(i + 1), tok(i + 2), tok(i + 3)], row, pf),
            }
        })
    }
}

/// The walk of the row-by-row decode drivers for block-quantised weights (`direct` here and
/// `quantized_i16::rows`): the task's weight rows in memory order, each prefetching ahead
/// (`prefetch::row_ahead`), and for each row its tokens `group` (at most four) at a time;
/// `dot(row, first_token, count)` returns the `count` sums in its first lanes.
///
/// # Safety
/// No other thread touches the task's `out` entries.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn by_row<B>(
    w: &[B],
    s: Shape,
    t: Task,
    group: usize,
    out: &SharedOut,
    mut dot: impl FnMut(&[B], usize, usize) -> [f32; 4],
) {
    let per_row = s.k / QK;
    let end = w.as_ptr_range().end.cast();
    for r in t.r0..t.r1 {
        let row = &w[r * per_row..(r + 1) * per_row];
        super::prefetch::row_ahead(row.as_ptr().cast(), end);
        let mut i = t.i0;
        while i < t.i1 {
            let n = (t.i1 - i).min(group);
            let sums = dot(row, i, n);
            for (a, v) in sums.iter().take(n).enumerate() {
                // SAFETY: (i + a, r) lies in this task's rectangle.
                unsafe { out.write((i + a) * s.n + r, *v) };
            }
            i += n;
        }
    }
}

/// `v` in the first `M` of four lanes (the decode drivers take token rows up to four at a time).
#[cfg(target_arch = "x86_64")]
pub(super) fn pad<const M: usize>(v: [f32; M]) -> [f32; 4] {
    std::array::from_fn(|a| if a < M { v[a] } else { 0.0 })
}

/// Widens groups of the task's rows into this thread's buffer and runs the f32 tiles on them.
///
/// # Safety
/// `isa` must be supported; no other thread touches the task's `out` entries.
unsafe fn widened<B: QuantBlock>(isa: Isa, x: &[f32], w: &[B], s: Shape, t: Task, out: &SharedOut) {
    let per_row = s.k / QK;
    // SAFETY: the caller's contract.
    unsafe { widened_with(isa, x, s, t, out, |r0, r1, buf| dequantize_into(&w[r0 * per_row..r1 * per_row], buf)) }
}

/// One task against the whole Q8_0 matrix `w` in row panels ([`crate::quant::panels`]) off its
/// integer dot path (prefill, exact calls, ISAs without VNNI): rows widened as for plain blocks.
///
/// # Safety
/// `isa` must be supported; no other thread touches the task's `out` entries.
pub(super) unsafe fn panels_task(isa: Isa, x: &[f32], w: &[u8], s: Shape, t: Task, out: &SharedOut) {
    let dequantize = |r0: usize, _r1: usize, buf: &mut [f32]| panels::dequantize_rows(w, s.n, s.k, r0, buf);
    // SAFETY: the caller's contract.
    unsafe { widened_with(isa, x, s, t, out, dequantize) }
}

/// Widens groups of the task's rows (`dequantize(r0, r1, buf)` writes rows `r0..r1` into `buf`)
/// into this thread's buffer and runs the f32 tiles on them.
///
/// # Safety
/// `isa` must be supported; no other thread touches the task's `out` entries.
unsafe fn widened_with(
    isa: Isa,
    x: &[f32],
    s: Shape,
    t: Task,
    out: &SharedOut,
    dequantize: impl Fn(usize, usize, &mut [f32]),
) {
    let group = (WIDEN_BYTES / (s.k * std::mem::size_of::<f32>())).max(1).next_multiple_of(ROW_ALIGN);
    WIDENED.with_borrow_mut(|buf| {
        let mut r0 = t.r0;
        while r0 < t.r1 {
            let r1 = (r0 + group).min(t.r1);
            buf.resize((r1 - r0) * s.k, 0.0);
            dequantize(r0, r1, buf);
            // SAFETY: the caller's contract; `buf` holds rows `r0..r1`, counted from `r0`.
            unsafe { f32_rows(isa, x, buf, r0, s, Task { r0, r1, ..t }, out) };
            r0 = r1;
        }
    });
}

/// Off x86 every format takes the widening path; the trait has no methods there.
#[cfg(not(target_arch = "x86_64"))]
mod portable {
    use super::Kernel;
    use crate::quant::{BlockQ4_0, BlockQ4_1, BlockQ8_0};
    impl Kernel for BlockQ8_0 {}
    impl Kernel for BlockQ4_0 {}
    impl Kernel for BlockQ4_1 {}
}
