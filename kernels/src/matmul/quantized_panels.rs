//! Matmuls of any size against Q8_0 weights in row panels ([`crate::quant::panels`]) with AVX-512
//! VNNI's 16-bit integer dot products, on the ISAs with VNNI ([`Isa::has_vnni`](crate::Isa::has_vnni)):
//! up to 8 token rows at a time.
//!
//! The token rows are quantised once per call by `quantized_i16::quantize`: per 32-value block,
//! `d = max|x| / 32767`, ties to even, so each value moves by at most `d / 2`. A panel's 16 rows
//! lie one per 32-bit lane. Per block column and step, one `vpmovsxbw` widens the 16 rows' next
//! value pair to 16 bits, once for all the task's tokens, and one `vpdpwssd` per token multiplies
//! it by that token's pair broadcast to every lane, so each lane adds two products of its own
//! row. After a block's 16 steps each lane holds its row's integer dot product with the token's
//! block, exactly: 32 products of at most 128 · 32767, below 2³¹ (its conversion to f32 rounds
//! sums above 2²⁴, a relative 2⁻²⁴). One conversion, one multiply (the 16 rows' block scales by
//! the token's) and one FMA add the block into the token's f32 accumulator, whose 16 lanes end
//! as the panel's 16 outputs: no horizontal sums, and the scales cost three vector operations per
//! block, token and 16 rows. Where the ISA's [`Tuning`] asks for it, two or more tokens take
//! three whole panels side by side, each token pair broadcast into a register once for all three;
//! the integer sums and the block's f32 operations are the same (`add_block`), so the results are
//! too. The bf16 path (`quantized_bf16`) instead dequantises every block of every row to bf16
//! before its dot products, which bounds batched decode by arithmetic.
//!
//! Tasks start on panel boundaries (`TASK_ROW_ALIGN` in `matmul/plan.rs` is a multiple of
//! [`PANEL`]) and walk their panels in memory order, one linear stream; a prefill task takes its rows in
//! L2-sized stretches, each against all its tokens 8 at a time, which runs about twice as fast
//! as widening the rows for the f32 tiles. A token's sums take the blocks in order whatever else
//! is in the batch, so they do not depend on the batch, on the call's size, on the task cut or on
//! which panels share a group.

use std::arch::x86_64::*;

use super::prefetch::Prefetcher;
use super::quantized_i16::QuantRows16;
use super::{Shape, Task};
use crate::quant::QK;
use crate::quant::panels::{BLOCK_BYTES, PANEL, Panel, STEPS};
use crate::simd::SharedOut;

/// Most token rows `rows` takes at once (it dispatches on each count up to 8); `task` cuts larger
/// tasks into such chunks.
pub(super) const MAX_TOKENS: usize = super::DECODE_MAX_TOKENS;
const _: () = assert!(MAX_TOKENS == 8, "quantized_panels::rows has one arm per token count up to 8");

/// How far ahead of the block column being multiplied the panel's stream is prefetched, spread
/// over the panel's columns (into L2; a lone token's into L1, see [`Tuning`]). With several
/// tokens a panel is consumed slowly enough that the hardware prefetcher falls behind: streaming 30 layers of a 1B-class model's shapes from
/// memory at 8 tokens on 2 threads, without it this path ran at 0.85 of the bf16-dequantising
/// path's rate, and with it (4 KiB; 2 and 8 KiB were slower) at 1.2–1.3 times.
const AHEAD_BYTES: usize = 4096;
/// Token rows from which that prefetch is always issued. A lone token streams its panels fast
/// and linearly: on AMD Zen 4 the hardware prefetcher follows it on its own (there it was slower
/// with the prefetch), so a lone token is prefetched for only where the ISA asks for it
/// ([`Isa::prefetches_lone_token_streams`](crate::Isa::prefetches_lone_token_streams)). On an
/// Intel Ice Lake host, streaming SmolLM2-135M's 30 layers in panels at one token on 2 threads
/// (alternating, against the read probe): 0.75–0.82 of the read rate without it, 0.86–0.94 with.
const PREFETCH_FROM_TOKENS: usize = 2;

/// Panels multiplied side by side where [`Tuning::group_panels`] asks for it: three, so that a
/// task of 48 rows (`TASK_ROW_ALIGN` in `matmul/plan.rs`) is one group.
const GROUP: usize = 3;

/// How the path runs on a given ISA (measured per ISA; see [`Tuning::for_isa`]).
#[derive(Clone, Copy, Debug)]
pub(super) struct Tuning {
    /// Whether a lone token's panels are prefetched too (see [`PREFETCH_FROM_TOKENS`]), and then
    /// into L1, line by line [`AHEAD_BYTES`] ahead: on the Ice Lake host, streaming SmolLM2-135M's
    /// 30 layers in panels at one token on 2 threads (alternating builds, against the read probe),
    /// 0.83–0.90 of the read rate into L2, and into L1 0.96–0.98 in three rounds of four (0.86 in
    /// the fourth; 2 KiB ahead: 0.89–0.92, 8 KiB: 0.93–0.94); `bench engine` Q8_0 batch-1 decode,
    /// alternating builds, went from 0.76–0.78 of its roofline to 0.82–0.86. With more tokens L1
    /// measured no different.
    prefetch_lone: bool,
    /// Whether from two tokens on [`GROUP`] whole panels are multiplied side by side, each token
    /// pair broadcast into a register once and multiplied into every panel of the group, instead
    /// of one `vpdpwssd` with a broadcast memory operand per panel and token. On the Ice Lake host
    /// such a `vpdpwssd` issued at about one per 1.3 cycles and the register form shared three ways
    /// at about one per cycle; Q8_0 matmuls of SmolLM2-135M's shapes at 8 tokens from cache (2
    /// threads) took 0.70–0.91 of the time. Not measured on AMD Zen 4, which keeps one panel at a
    /// time.
    group_panels: bool,
}

impl Tuning {
    /// The tuning for `isa` (one of the ISAs with VNNI).
    pub(super) fn for_isa(isa: crate::Isa) -> Self {
        let intel = isa.prefetches_lone_token_streams();
        Tuning { prefetch_lone: intel, group_panels: intel }
    }
}

/// Bytes of weight rows a prefill task multiplies with all its token rows, 8 at a time, before
/// moving on: they stay in L2 for all of them.
const PREFILL_ROWS_BYTES: usize = 256 * 1024;

/// One task: its rows against its token rows, 8 at a time ([`MAX_TOKENS`]). A prefill task's
/// rows are taken in L2-sized stretches, each against all its token rows, so that the weights are
/// read from memory once per task rather than once per 8 tokens.
///
/// # Safety
/// As for [`rows`], except that the task may have any number of token rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
pub(super) unsafe fn task(xq: &QuantRows16, w: &[u8], s: Shape, t: Task, tuning: Tuning, out: &SharedOut) {
    if t.i1 - t.i0 <= MAX_TOKENS {
        // SAFETY: the caller's contract.
        return unsafe { rows(xq, w, s, t, tuning, out) };
    }
    let row_bytes = s.k / QK * BLOCK_BYTES;
    let stretch = (PREFILL_ROWS_BYTES / row_bytes.max(1)).max(1).next_multiple_of(PANEL);
    for r0 in (t.r0..t.r1).step_by(stretch) {
        for i0 in (t.i0..t.i1).step_by(MAX_TOKENS) {
            let chunk = Task { r0, r1: (r0 + stretch).min(t.r1), i0, i1: (i0 + MAX_TOKENS).min(t.i1) };
            // SAFETY: the caller's contract, for a part of the task (its rows start on a panel).
            unsafe { rows(xq, w, s, chunk, tuning, out) };
        }
    }
}

/// The task's panels against its token rows (at most [`MAX_TOKENS`]).
///
/// # Safety
/// The CPU must have the module's features; `xq` was quantised from this call's token rows; `w`
/// is the whole `(s.n, s.k)` matrix in row panels; no other thread touches the task's `out`
/// entries.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
unsafe fn rows(xq: &QuantRows16, w: &[u8], s: Shape, t: Task, tuning: Tuning, out: &SharedOut) {
    let per_row = s.k / QK;
    assert!(xq.scales.len() >= t.i1 * per_row && xq.q.len() >= t.i1 * s.k, "token rows quantised for this call");
    assert_eq!(w.len(), s.n * per_row * BLOCK_BYTES, "the whole matrix in row panels");
    assert!(t.r0.is_multiple_of(PANEL) && (t.r1.is_multiple_of(PANEL) || t.r1 == s.n), "tasks of whole panels");
    assert!((1..=MAX_TOKENS).contains(&(t.i1 - t.i0)), "at most 8 token rows");
    // SAFETY (every arm): the caller's contract, and the lengths asserted above.
    unsafe {
        match t.i1 - t.i0 {
            1 => panels::<1>(xq, w, s, t, tuning, out),
            2 => panels::<2>(xq, w, s, t, tuning, out),
            3 => panels::<3>(xq, w, s, t, tuning, out),
            4 => panels::<4>(xq, w, s, t, tuning, out),
            5 => panels::<5>(xq, w, s, t, tuning, out),
            6 => panels::<6>(xq, w, s, t, tuning, out),
            7 => panels::<7>(xq, w, s, t, tuning, out),
            _ => panels::<8>(xq, w, s, t, tuning, out),
        }
    }
}

/// One quantised token row: its values and its block scales.
#[derive(Clone, Copy)]
struct Token<'a> {
    q: &'a [i16],
    scales: &'a [f32],
}

/// [`rows`] for exactly `T` token rows.
///
/// # Safety
/// As for [`rows`]; also `t.i1 - t.i0 == T`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
unsafe fn panels<const T: usize>(xq: &QuantRows16, w: &[u8], s: Shape, t: Task, tuning: Tuning, out: &SharedOut) {
    let per_row = s.k / QK;
    let xs: [Token; T] = std::array::from_fn(|a| {
        let i = t.i0 + a;
        Token { q: &xq.q[i * s.k..(i + 1) * s.k], scales: &xq.scales[i * per_row..(i + 1) * per_row] }
    });
    let end = w.as_ptr_range().end;
    let write = |p: usize, height: usize, sums: &[__m512; T]| {
        for (a, v) in sums.iter().enumerate() {
            // SAFETY: `__m512` and `[f32; 16]` have the same size and every bit pattern is valid.
            let lanes: [f32; PANEL] = unsafe { std::mem::transmute(*v) };
            for (l, v) in lanes.iter().take(height).enumerate() {
                // SAFETY: (t.i0 + a, p · 16 + l) lies in this task's rectangle.
                unsafe { out.write((t.i0 + a) * s.n + p * PANEL + l, *v) };
            }
        }
    };
    let (first, last) = (t.r0 / PANEL, t.r1.div_ceil(PANEL));
    let full_end = first.max(t.r1 / PANEL);
    let mut p = first;
    if T >= 2 && tuning.group_panels {
        let panel_len = per_row * PANEL * BLOCK_BYTES;
        while p + GROUP <= full_end {
            let bytes = &w[p * panel_len..][..GROUP * panel_len];
            let mut ahead = Prefetcher::span(bytes.as_ptr().wrapping_add(AHEAD_BYTES), bytes.len(), end, per_row);
            // SAFETY: the caller's contract; `bytes` is `GROUP` whole panels.
            let sums = unsafe { dot_group::<T, GROUP>(&xs, bytes, panel_len, &mut ahead) };
            for (j, sums) in sums.iter().enumerate() {
                write(p + j, PANEL, sums);
            }
            p += GROUP;
        }
    }
    for p in p..last {
        let panel = Panel::of(p, s.n, per_row);
        let bytes = &w[panel.start..][..panel.column(per_row)];
        let prefetched = if T >= PREFETCH_FROM_TOKENS || tuning.prefetch_lone { bytes.len() } else { 0 };
        let mut ahead = Prefetcher::span(bytes.as_ptr().wrapping_add(AHEAD_BYTES), prefetched, end, per_row);
        // SAFETY: the caller's contract; `bytes` is the panel's `per_row` block columns and every
        // token row has `per_row` blocks.
        let sums = unsafe {
            if panel.height == PANEL {
                dot::<T, true>(&xs, bytes, Panel { height: PANEL, ..panel }, &mut ahead)
            } else {
                dot::<T, false>(&xs, bytes, panel, &mut ahead)
            }
        };
        write(p, panel.height, &sums);
    }
}

/// `acc` plus, in each 32-bit lane, `w`'s two 16-bit values times the pair `offset` bytes past
/// `row` (broadcast to every lane): one `vpdpwssd` with a broadcast memory operand. Written out
/// because LLVM may otherwise split it into `vpmaddwd` and `vpaddd` (shortening the accumulator's
/// dependency chain at twice the vector operations), and with the token row's start and the
/// offset as separate registers so that the tokens' addresses are not formed one from another;
/// together these made batched decode here 1.4 times faster.
///
/// # Safety
/// The CPU must have AVX-512F and VNNI; 4 bytes `offset` bytes past `row` are readable.
#[target_feature(enable = "avx512f,avx512vnni")]
#[inline]
unsafe fn dot_pair(acc: __m512i, w: __m512i, row: *const i16, offset: usize) -> __m512i {
    let mut acc = acc;
    // SAFETY: the caller's contract; the instruction reads those 4 bytes and writes only `acc`.
    unsafe {
        std::arch::asm!(
            "vpdpwssd {acc}, {w}, dword ptr [{row} + {offset}]{{1to16}}",
            acc = inout(zmm_reg) acc,
            w = in(zmm_reg) w,
            row = in(reg) row,
            offset = in(reg) offset,
            options(pure, readonly, nostack, preserves_flags),
        );
    }
    acc
}

/// Each token's dot products with the rows of `panel` (whose bytes are `bytes`; [`PANEL`] rows
/// when `FULL`), in the rows' lanes (the others zero).
///
/// # Safety
/// The CPU must have the module's features; `bytes` is `panel`, of as many blocks per row as each
/// token row has.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
#[inline]
unsafe fn dot<const T: usize, const FULL: bool>(
    xs: &[Token; T],
    bytes: &[u8],
    panel: Panel,
    ahead: &mut Prefetcher,
) -> [__m512; T] {
    let (blocks, height) = (xs[0].scales.len(), panel.height);
    assert!(bytes.len() == blocks * height * BLOCK_BYTES && (1..=PANEL).contains(&height), "panel length");
    // The masks of a partial panel's steps (2 bytes per row) and scales (one f16 per row).
    let step_mask = (u32::MAX as u64 >> (32 - 2 * height)) as u32;
    let scale_mask = (u16::MAX as u32 >> (PANEL - height)) as u16;
    let mut acc = [_mm512_setzero_ps(); T];
    for c in 0..blocks {
        let column = bytes[panel.column(c)..].as_ptr();
        if T == 1 {
            ahead.step_l1();
        } else {
            ahead.step();
        }
        let mut ints = [_mm512_setzero_si512(); T];
        for st in 0..STEPS {
            // SAFETY: step `st` of block column `c` is `2 · height` bytes inside the panel (masked
            // to them when the panel is partial); masked-out bytes are not read.
            let raw = unsafe {
                let p = column.add(panel.step(st));
                if FULL { _mm256_loadu_si256(p.cast()) } else { _mm256_maskz_loadu_epi8(step_mask, p.cast()) }
            };
            let wv = _mm512_cvtepi8_epi16(raw);
            for (ints, x) in ints.iter_mut().zip(xs) {
                // SAFETY: values `32 c + 2 st` and the next lie in the token row (unchecked: this
                // is the innermost loop).
                *ints = unsafe { dot_pair(*ints, wv, x.q.as_ptr(), 2 * (c * QK + 2 * st)) };
            }
        }
        // SAFETY: the column starts with `height` f16 scales (masked to them when partial).
        let dw = _mm512_cvtph_ps(unsafe {
            if FULL { _mm256_loadu_si256(column.cast()) } else { _mm256_maskz_loadu_epi16(scale_mask, column.cast()) }
        });
        add_block(&mut acc, ints, dw, xs, c);
    }
    acc
}

/// Adds block column `c` into each token's f32 accumulator: its integer sums `ints`, converted,
/// times the panel's 16 row scales `dw` times the token's block scale. The one place [`dot`] and
/// [`dot_group`] fold a block, so both give a panel the same bits.
#[target_feature(enable = "avx512f")]
#[inline]
fn add_block<const T: usize>(acc: &mut [__m512; T], ints: [__m512i; T], dw: __m512, xs: &[Token; T], c: usize) {
    for ((acc, ints), x) in acc.iter_mut().zip(ints).zip(xs) {
        let scale = _mm512_mul_ps(dw, _mm512_set1_ps(x.scales[c]));
        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ints), scale, *acc);
    }
}

/// `acc` plus `vpdpwssd` of `w` and `x`, register operands: [`dot_pair`]'s instruction for a
/// token pair already broadcast into `x` (written out for the same reason).
#[target_feature(enable = "avx512f,avx512vnni")]
#[inline]
fn dpwssd(acc: __m512i, w: __m512i, x: __m512i) -> __m512i {
    let mut acc = acc;
    // SAFETY: register operands only; the caller guarantees the features.
    unsafe {
        std::arch::asm!(
            "vpdpwssd {acc}, {w}, {x}",
            acc = inout(zmm_reg) acc,
            w = in(zmm_reg) w,
            x = in(zmm_reg) x,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// Each token's dot products with the rows of `P` whole panels lying side by side in `bytes`
/// (`panel_len` bytes each), panel by panel: per block column and step, each panel's pairs are
/// widened once and each token's pair is broadcast once for all `P` panels. Every panel's sums
/// are formed exactly as [`dot`] forms them.
///
/// # Safety
/// The CPU must have the module's features; each panel has as many blocks per row as each token
/// row has.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
#[inline]
unsafe fn dot_group<const T: usize, const P: usize>(
    xs: &[Token; T],
    bytes: &[u8],
    panel_len: usize,
    ahead: &mut Prefetcher,
) -> [[__m512; T]; P] {
    let blocks = xs[0].scales.len();
    assert!(bytes.len() == P * panel_len && panel_len == blocks * PANEL * BLOCK_BYTES, "whole panels");
    let full = Panel { start: 0, height: PANEL };
    let mut acc = [[_mm512_setzero_ps(); T]; P];
    for c in 0..blocks {
        let cols: [*const u8; P] = std::array::from_fn(|j| bytes[j * panel_len + full.column(c)..].as_ptr());
        ahead.step();
        let mut ints = [[_mm512_setzero_si512(); T]; P];
        for st in 0..STEPS {
            // SAFETY: step `st` of each panel's block column `c` lies inside `bytes`.
            let wv: [__m512i; P] = std::array::from_fn(|j| unsafe {
                _mm512_cvtepi8_epi16(_mm256_loadu_si256(cols[j].add(full.step(st)).cast()))
            });
            for (a, x) in xs.iter().enumerate() {
                // SAFETY: values `32 c + 2 st` and the next lie in the token row.
                let pair = unsafe { x.q.as_ptr().add(c * QK + 2 * st).cast::<i32>().read_unaligned() };
                let xv = _mm512_set1_epi32(pair);
                for j in 0..P {
                    ints[j][a] = dpwssd(ints[j][a], wv[j], xv);
                }
            }
        }
        for ((acc, ints), col) in acc.iter_mut().zip(ints).zip(cols) {
            // SAFETY: each column starts with the panel's 16 f16 scales.
            let dw = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(col.cast()) });
            add_block(acc, ints, dw, xs, c);
        }
    }
    acc
}
