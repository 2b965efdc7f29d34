//! Decode-sized matmuls of 2 to 8 token rows against Q8_0 weights with AVX-512 VNNI integer dot
//! products ([`Isa::Avx512Bf16`](crate::Isa::Avx512Bf16), which implies VNNI), for calls that
//! allow 8-bit token rows ([`InputRounding::Int8`](super::InputRounding::Int8)).
//!
//! The call's token rows are quantised once, as ggml's Q8_0 × Q8_0 path does (`quantize`): per
//! 32-value block, `d = max|x| / 127` and `q = round(x / d)` (computed as `x · (1/d)`, ties to
//! even), so `|q| ≤ 127`. Against the reference (f32 token values) that is the only error: each
//! value moves by at most `d / 2` of its block.
//!
//! Blocks go in groups of eight, one per 32-bit lane. The token rows are stored with each group's
//! blocks interleaved in 4-byte steps, and each weight row's group is transposed the same way in
//! registers (once for all the token rows), so eight `vpdpbusd` — 32 unsigned by 32 signed bytes,
//! added in fours into 8 int32 lanes — leave every block's whole integer dot product in its own
//! lane with no horizontal sums. The weight bytes are made unsigned by adding 128, and the
//! token's precomputed `-128 · Σ q_x` per block starts its integer sum, so the integer results are
//! exact. One conversion, one multiply by the token's block scales and one FMA by the weight's
//! finish the group into the token's float lanes, summed by one fixed tree at the end of the row.
//! A row's blocks past its last whole group (its tail) share one group with the tails of the next
//! rows, as many as fit ([`Layout`]), so lanes compute padding only where whole tails cannot fill
//! a group (none for tails of 1, 2 or 4 blocks); the token rows hold their tail once per row of
//! such a set. A token's sum is
//! formed the same way whatever else is in the batch and whichever rows share its tail group.
//!
//! Per block and token this is one `vpdpbusd` plus an eighth of the group's conversion, where the
//! bf16 path (`quantized_bf16`) pays a `vdpbf16ps` and the dequantisation of every block to bf16.

use std::arch::x86_64::*;

use super::{QUANT_PREFETCH_AHEAD_BYTES, Shape, Task};
use crate::quant::{BlockQ8_0, QK};
use crate::simd::SharedOut;
use crate::simd::avx2::hsum;

/// Most token rows this path takes; `rows` dispatches on each count up to 8 (though `path` in
/// `matmul.rs` keeps a lone token, which is memory-bound, on the exact f32 path).
pub(super) const MAX_TOKENS: usize = super::DECODE_MAX_TOKENS;
const _: () = assert!(MAX_TOKENS == 8, "quantized_vnni::rows has one arm per token count up to 8");

/// Blocks per group: one 32-bit lane of a 256-bit vector each.
const GROUP: usize = 8;
/// Bytes of one group's interleaved values.
const GROUP_BYTES: usize = GROUP * QK;

/// How a row's blocks fall into groups: `full` whole groups, then `tail` blocks (fewer than 8).
/// The tails of `rows_per_tail` consecutive rows share one group (lanes `i · tail ..` for the
/// set's row `i`), so a row of 18 blocks costs 2¼ groups rather than 3.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Layout {
    full: usize,
    tail: usize,
    rows_per_tail: usize,
}

impl Layout {
    fn new(blocks: usize) -> Self {
        let tail = blocks % GROUP;
        Layout { full: blocks / GROUP, tail, rows_per_tail: GROUP.checked_div(tail).unwrap_or(1) }
    }

    /// Groups stored per token row: the full ones, then one holding its tail once for each row
    /// of a set.
    fn token_groups(self) -> usize {
        self.full + usize::from(self.tail > 0)
    }
}

/// A call's token rows quantised to 8 bits per 32-value block, in groups of [`GROUP`] blocks laid
/// out as [`Layout`] says (unused lanes zero). Empty where the call has no weight on this path.
#[derive(Default)]
pub(super) struct QuantInput {
    /// Per row and group, [`GROUP_BYTES`] bytes: the group's blocks interleaved in 4-byte steps,
    /// byte `32 s + 4 j + e` being value `4 s + e` of lane `j`'s block.
    q: Vec<i8>,
    /// Per row and group, lane `j`: `-128 · Σ q` over lane `j`'s block.
    unbias: Vec<i32>,
    /// Per row and group, lane `j`: the scale `d` of lane `j`'s block.
    scales: Vec<f32>,
    layout: Layout,
}

/// Quantises the `m` (at most [`MAX_TOKENS`]) rows of `x`, `k` values each (a multiple of 32).
///
/// # Safety
/// The CPU must have the module's features.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn quantize(x: &[f32], m: usize, k: usize) -> QuantInput {
    assert!(m <= MAX_TOKENS && k.is_multiple_of(QK) && x.len() == m * k, "decode-sized rows of whole blocks");
    let layout = Layout::new(k / QK);
    let groups = layout.token_groups();
    let mut q = vec![0i8; m * groups * GROUP_BYTES];
    let mut unbias = vec![0i32; m * groups * GROUP];
    let mut scales = vec![0.0f32; m * groups * GROUP];
    for (i, row) in x.chunks_exact(k).enumerate() {
        for (b, src) in row.chunks_exact(QK).enumerate() {
            // SAFETY: `src` is 32 values (two 16-lane loads).
            let (steps, sum, d) = unsafe { quantize_block(src) };
            // A full group's block has one lane; a tail block one in each row's share of the
            // tail group.
            let (g, lanes) = if b < layout.full * GROUP {
                (b / GROUP, b % GROUP..b % GROUP + 1)
            } else {
                let t = b - layout.full * GROUP;
                (layout.full, t..t + layout.tail * layout.rows_per_tail)
            };
            let g = i * groups + g;
            for j in lanes.step_by(layout.tail.max(1)) {
                let slot = &mut q[g * GROUP_BYTES..(g + 1) * GROUP_BYTES];
                for (s, v) in steps.iter().enumerate() {
                    slot[32 * s + 4 * j..32 * s + 4 * j + 4].copy_from_slice(&v.to_ne_bytes().map(|b| b as i8));
                }
                unbias[g * GROUP + j] = -128 * sum;
                scales[g * GROUP + j] = d;
            }
        }
    }
    QuantInput { q, unbias, scales, layout }
}

/// One block of 32 values: its quantised bytes as eight 4-byte steps, their sum and the scale.
///
/// # Safety
/// The CPU must have the module's features; `src` holds at least 32 values.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn quantize_block(src: &[f32]) -> ([i32; 8], i32, f32) {
    assert!(src.len() >= QK, "a whole block");
    // SAFETY: 32 values (two 16-lane loads), asserted above.
    let (lo, hi) = unsafe { (_mm512_loadu_ps(src.as_ptr()), _mm512_loadu_ps(src.as_ptr().add(16))) };
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    let d = amax / 127.0;
    let id = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
    // Default rounding (nearest even); |x · id| ≤ 127, so the narrowing never saturates on
    // finite input.
    let (qlo, qhi) = (_mm512_cvtps_epi32(_mm512_mul_ps(lo, id)), _mm512_cvtps_epi32(_mm512_mul_ps(hi, id)));
    let bytes = _mm256_set_m128i(_mm512_cvtsepi32_epi8(qhi), _mm512_cvtsepi32_epi8(qlo));
    // SAFETY: a 256-bit vector and `[i32; 8]` have the same size; every bit pattern is valid.
    let steps: [i32; 8] = unsafe { std::mem::transmute(bytes) };
    (steps, _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi)), d)
}

/// The task's weight rows in memory order (one linear stream per thread), each against all of
/// the task's token rows.
///
/// # Safety
/// The CPU must have the module's features; `xq` was quantised from this call's input; no other
/// thread touches the task's `out` entries.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn rows(xq: &QuantInput, w: &[BlockQ8_0], s: Shape, t: Task, out: &SharedOut) {
    let layout = Layout::new(s.k / QK);
    let groups = layout.token_groups();
    assert!(xq.layout == layout && xq.scales.len() >= t.i1 * groups * GROUP, "input quantised for this call");
    // SAFETY (every arm): the caller's contract.
    unsafe {
        match t.i1 - t.i0 {
            1 => rows_of::<1>(xq, w, s, t, out),
            2 => rows_of::<2>(xq, w, s, t, out),
            3 => rows_of::<3>(xq, w, s, t, out),
            4 => rows_of::<4>(xq, w, s, t, out),
            5 => rows_of::<5>(xq, w, s, t, out),
            6 => rows_of::<6>(xq, w, s, t, out),
            7 => rows_of::<7>(xq, w, s, t, out),
            _ => rows_of::<8>(xq, w, s, t, out),
        }
    }
}

/// [`rows`] for exactly `T` token rows, in sets of `rows_per_tail` rows: each row's full groups,
/// then the set's shared tail group. A row's sum is its full groups' lanes (one fixed tree) plus
/// its tail lanes in order, whatever the set or the batch.
///
/// # Safety
/// As for [`rows`]; also `t.i1 - t.i0 == T`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn rows_of<const T: usize>(xq: &QuantInput, w: &[BlockQ8_0], s: Shape, t: Task, out: &SharedOut) {
    let Layout { full, tail, rows_per_tail } = xq.layout;
    let per_row = s.k / QK;
    let tail_group = full;
    let row = |r: usize| &w[r * per_row..(r + 1) * per_row];
    let mut r = t.r0;
    while r < t.r1 {
        let set = rows_per_tail.min(t.r1 - r);
        let mut sums = [[0.0f32; GROUP]; T];
        for i in 0..set {
            let acc = full_groups::<T>(xq, t.i0, &row(r + i)[..full * GROUP]);
            for (sum, acc) in sums.iter_mut().zip(&acc) {
                sum[i] = hsum(*acc);
            }
        }
        if tail > 0 {
            let mut blocks = [None; GROUP];
            for i in 0..set {
                for (j, b) in row(r + i)[full * GROUP..].iter().enumerate() {
                    blocks[i * tail + j] = Some(b);
                }
            }
            let (steps, dw) = load_group(blocks);
            for (a, sum) in sums.iter_mut().enumerate() {
                // SAFETY: row `t.i0 + a` has its tail group (asserted in `rows`).
                let lanes: [f32; GROUP] = unsafe {
                    let (ints, xs) = group_ints(xq, (t.i0 + a) * (full + 1) + tail_group, &steps);
                    std::mem::transmute(_mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(ints), xs), dw))
                };
                for (i, sum) in sum.iter_mut().enumerate().take(set) {
                    for v in &lanes[i * tail..(i + 1) * tail] {
                        *sum += v;
                    }
                }
            }
        }
        for (a, sum) in sums.iter().enumerate() {
            for (i, v) in sum.iter().enumerate().take(set) {
                // SAFETY: (t.i0 + a, r + i) lies in this task's rectangle.
                unsafe { out.write((t.i0 + a) * s.n + r + i, *v) };
            }
        }
        r += set;
    }
}

/// Per token row `i0 + a`, the lanes of `Σ_g d_w · d_x · Σ q_w · q_x` over the full groups of the
/// weight row `w` (whole groups of blocks).
///
/// Per group the weight blocks are transposed in 4-byte steps (once for every token row), so
/// that lane `j` of every vector belongs to block `j`, like the token rows' interleaved bytes:
/// eight `vpdpbusd` then leave each block's whole integer dot product in its own lane, with no
/// horizontal sums, and one conversion, one multiply by the token's scales and one FMA by the
/// weight's scales finish the group.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn full_groups<const T: usize>(xq: &QuantInput, i0: usize, w: &[BlockQ8_0]) -> [__m256; T] {
    let groups = xq.layout.token_groups();
    assert!(w.len() == xq.layout.full * GROUP && xq.scales.len() >= (i0 + T) * groups * GROUP, "row lengths");
    let mut acc = [_mm256_setzero_ps(); T];
    for (g, blocks) in w.chunks_exact(GROUP).enumerate() {
        if T >= 2 {
            // A hint: addresses past the matrix are harmless (prefetches never fault).
            let ahead = blocks.as_ptr().cast::<u8>().wrapping_add(QUANT_PREFETCH_AHEAD_BYTES);
            for line in 0..std::mem::size_of_val(blocks).div_ceil(64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line).cast());
            }
        }
        let (steps, dw) = load_group(std::array::from_fn(|j| blocks.get(j)));
        for (a, acc) in acc.iter_mut().enumerate() {
            // SAFETY: row `i0 + a` has group `g` (asserted above).
            let (ints, xs) = unsafe { group_ints(xq, (i0 + a) * groups + g, &steps) };
            *acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(ints), xs), dw, *acc);
        }
    }
    acc
}

/// Token group `at`'s exact integer dot products with the weight `steps`, lane by lane, and its
/// scales. The weight bytes are unsigned (`+ 128`) and the token's precomputed `-128 · Σ q_x`
/// starts the sums, so the integers are exact (and do not depend on their order).
///
/// # Safety
/// The CPU must have the module's features; `xq` holds group `at`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn group_ints(xq: &QuantInput, at: usize, steps: &[__m256i; GROUP]) -> (__m256i, __m256) {
    // SAFETY: the caller guarantees group `at`: 256 bytes at `at * 256`, 8 lanes at `at * 8`.
    unsafe {
        let xp = xq.q.as_ptr().add(at * GROUP_BYTES).cast::<__m256i>();
        // Two chains (even and odd steps) for the latency of `vpdpbusd`.
        let mut even = _mm256_loadu_si256(xq.unbias.as_ptr().add(at * GROUP).cast());
        let mut odd = _mm256_setzero_si256();
        for s in (0..GROUP).step_by(2) {
            even = _mm256_dpbusd_epi32(even, steps[s], _mm256_loadu_si256(xp.add(s)));
            odd = _mm256_dpbusd_epi32(odd, steps[s + 1], _mm256_loadu_si256(xp.add(s + 1)));
        }
        (_mm256_add_epi32(even, odd), _mm256_loadu_ps(xq.scales.as_ptr().add(at * GROUP)))
    }
}

/// Eight lanes' blocks (`None` counts as a zero block): their bytes transposed into steps and
/// made unsigned (`+ 128`), and their scales.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn load_group(blocks: [Option<&BlockQ8_0>; GROUP]) -> ([__m256i; GROUP], __m256) {
    let mut v = [_mm256_setzero_si256(); GROUP];
    let mut d = [0u16; GROUP];
    for (j, b) in blocks.iter().enumerate() {
        if let Some(b) = b {
            // SAFETY: `qs` is 32 bytes.
            v[j] = unsafe { _mm256_loadu_si256(b.qs.as_ptr().cast()) };
            d[j] = b.d.to_bits();
        }
    }
    let mut steps = transpose(v);
    for u in &mut steps {
        *u = _mm256_xor_si256(*u, _mm256_set1_epi8(i8::MIN));
    }
    // SAFETY: `d` is 16 bytes.
    (steps, _mm256_cvtph_ps(unsafe { _mm_loadu_si128(d.as_ptr().cast()) }))
}

/// 8 × 8 transpose of 32-bit lanes: lane `j` of output `s` is lane `s` of input `j`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn transpose(v: [__m256i; 8]) -> [__m256i; 8] {
    let lo32 = |a, b| _mm256_unpacklo_epi32(a, b);
    let hi32 = |a, b| _mm256_unpackhi_epi32(a, b);
    let (t0, t1, t2, t3) = (lo32(v[0], v[1]), hi32(v[0], v[1]), lo32(v[2], v[3]), hi32(v[2], v[3]));
    let (t4, t5, t6, t7) = (lo32(v[4], v[5]), hi32(v[4], v[5]), lo32(v[6], v[7]), hi32(v[6], v[7]));
    // Within each 128-bit half: u0 holds lanes 0 (low half) and 4 (high half) of v0..v3, u1
    // lanes 1 and 5, u2 lanes 2 and 6, u3 lanes 3 and 7; u4..u7 the same of v4..v7.
    let (u0, u1) = (_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2));
    let (u2, u3) = (_mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3));
    let (u4, u5) = (_mm256_unpacklo_epi64(t4, t6), _mm256_unpackhi_epi64(t4, t6));
    let (u6, u7) = (_mm256_unpacklo_epi64(t5, t7), _mm256_unpackhi_epi64(t5, t7));
    let low = |a, b| _mm256_permute2x128_si256::<0x20>(a, b);
    let high = |a, b| _mm256_permute2x128_si256::<0x31>(a, b);
    [low(u0, u4), low(u1, u5), low(u2, u6), low(u3, u7), high(u0, u4), high(u1, u5), high(u2, u6), high(u3, u7)]
}
