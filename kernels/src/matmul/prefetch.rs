//! Software prefetch of weights: the next sub-block for the tiled matmul tasks (`avx2`,
//! `avx512`), the stretch of the weight stream a few KiB past each row tile of the bf16 dot
//! products (`bf16_dot`, `bf16_pairs`) and past each Q8_0 panel (`quantized_panels`, into L1 for
//! a lone token where its tuning asks for it), a line a few pages ahead of each row for the
//! row-by-row decode drivers (`bf16_dot`, `bf16_pairs`, `quantized`, `quantized_i16`), and every
//! line a little ahead for the AVX-512 tiles' single-token driver (`avx512`).

use std::arch::x86_64::{_MM_HINT_T0, _MM_HINT_T1, _mm_prefetch};

/// How far ahead of the row being multiplied the AVX-512 tiles' single-token driver prefetches
/// every line of its weight stream into L1. That driver runs on the AVX-512 ISAs without bf16
/// dot products (Intel cores of the Ice Lake kind), whose hardware prefetchers alone leave a
/// lone token's loads waiting on memory. Measured on an Ice Lake host (2 threads, SmolLM2-135M's
/// 30 layers of bf16 matrices at one token, against the read probe, alternating configurations):
/// 0.61–0.84 of the read rate without it; 0.90–1.0 at 2 KiB, 0.85–0.97 at 1 KiB, 0.89–0.95 at
/// 4 KiB; into L2 instead of L1, 0.85–0.87 at 1 KiB. After the Q8_0 panels' lone-token prefetch
/// measured best at 4 KiB, the whole sweep (the LM head too), alternating builds in three rounds:
/// 0.93–0.95 at 2 KiB and 0.97–1.0 at 4 KiB (`bench engine` bf16 batch 1: 0.83–0.88 and
/// 0.84–0.88 of the roofline, within the host's noise).
const STREAM_AHEAD_BYTES: usize = 4096;

/// Prefetches into L1 every line of the bytes of `row` moved [`STREAM_AHEAD_BYTES`] on, up to
/// `end` (one past the matrix).
#[inline(always)]
pub(crate) fn stream_ahead<E>(row: &[E], end: *const u8) {
    let start = row.as_ptr().cast::<u8>().wrapping_add(STREAM_AHEAD_BYTES);
    let stop = start.wrapping_add(std::mem::size_of_val(row)).min(end);
    let mut line = start;
    while line < stop {
        // SAFETY: a prefetch is only a hint and never faults; `line` lies inside the matrix.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line.cast()) };
        line = line.wrapping_add(64);
    }
}

/// How far past the start of the row being multiplied the decode drivers prefetch one line into
/// L2, once per row. A decode kernel spends enough instructions per weight line that its own loads
/// run only a few rows ahead of use; one early line in each 4 KiB page ahead (hardware stream
/// prefetchers work within pages) gets the stream there going before the loads arrive. Measured on the test
/// host against a plain read of the same bytes, in alternating rounds within one process:
/// batch-1 bf16 rows of 576 values, 0.82–0.84 of the read rate without it and 0.87–0.89 with
/// it; SmolLM2-135M's whole batch-1 decode sweep, 0.82 and 0.84. Prefetching every line
/// instead, into L1 or L2, was slower than none.
const ROW_AHEAD_BYTES: usize = 8192;

/// Prefetches into L2 the line [`ROW_AHEAD_BYTES`] past `row_start`, unless that lies at or past
/// `end` (one past the matrix), so a task's last rows fetch nothing that no one reads.
#[inline(always)]
pub(crate) fn row_ahead(row_start: *const u8, end: *const u8) {
    let ahead = row_start.wrapping_add(ROW_AHEAD_BYTES);
    if ahead < end {
        // SAFETY: a prefetch is only a hint and never faults; `ahead` lies inside the matrix.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(ahead.cast()) };
    }
}

/// Software prefetch of the next weight sub-block into L2, spread evenly over the tile steps
/// that work on the current one: with few token rows (batched decode) the first pass over a
/// sub-block would otherwise wait on DRAM while the later passes find it in cache.
pub(crate) struct Prefetcher {
    next: *const u8,
    end: *const u8,
    lines_per_step: usize,
}

impl Prefetcher {
    const LINE: usize = 64;

    /// Prefetches all of `region` over `steps` calls of [`Prefetcher::step`].
    pub(crate) fn new<E>(region: &[E], steps: usize) -> Self {
        let range = region.as_ptr_range();
        Self::span(range.start.cast(), std::mem::size_of_val(region), range.end.cast(), steps)
    }

    /// Prefetches the `len` bytes from `start` (clipped at `end`, one past the matrix) over
    /// `steps` calls of [`Prefetcher::step`].
    pub(crate) fn span(start: *const u8, len: usize, end: *const u8, steps: usize) -> Self {
        let stop = start.wrapping_add(len).min(end);
        Prefetcher { next: start, end: stop, lines_per_step: len.div_ceil(Self::LINE).div_ceil(steps.max(1)) }
    }

    /// Issues the next share of prefetches into L2 (none once the region is covered).
    #[inline(always)]
    pub(crate) fn step(&mut self) {
        self.issue::<_MM_HINT_T1>();
    }

    /// [`Prefetcher::step`] into L1.
    #[inline(always)]
    pub(crate) fn step_l1(&mut self) {
        self.issue::<_MM_HINT_T0>();
    }

    #[inline(always)]
    fn issue<const HINT: i32>(&mut self) {
        for _ in 0..self.lines_per_step {
            if self.next >= self.end {
                return;
            }
            // SAFETY: a prefetch is only a hint and never faults; `next` lies inside the region.
            unsafe { _mm_prefetch::<HINT>(self.next.cast()) };
            self.next = self.next.wrapping_add(Self::LINE);
        }
    }
}
