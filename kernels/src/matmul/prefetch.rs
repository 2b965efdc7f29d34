//! Software prefetch of the next weight sub-block for the tiled matmul tasks (`avx2`, `avx512`).

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
        let lines = std::mem::size_of_val(region).div_ceil(Self::LINE);
        Prefetcher { next: range.start.cast(), end: range.end.cast(), lines_per_step: lines.div_ceil(steps.max(1)) }
    }

    /// Issues the next share of prefetches (none once the region is covered).
    #[inline(always)]
    pub(crate) fn step(&mut self) {
        use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
        for _ in 0..self.lines_per_step {
            if self.next >= self.end {
                return;
            }
            // SAFETY: a prefetch is only a hint and never faults; `next` lies inside the region.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(self.next.cast()) };
            self.next = self.next.wrapping_add(Self::LINE);
        }
    }
}
