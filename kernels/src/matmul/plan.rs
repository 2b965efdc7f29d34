//! How a matmul call is cut into parallel tasks: blocks of weight rows × blocks of tokens.
//!
//! Invariant: row blocks are multiples of [`TASK_ROW_ALIGN`] (every ISA's tile height and the
//! Q8_0 panel height divide it), except a matrix's last block, so tiles and panels never straddle
//! two tasks; every (token, weight row) pair belongs to exactly one task.

use super::ROW_ALIGN;

/// Tasks' row blocks are multiples of this: of [`ROW_ALIGN`], and of the Q8_0 panel height
/// ([`crate::quant::panels::PANEL`]), so that tasks split panelled matrices between panels.
const TASK_ROW_ALIGN: usize = 48;
const _: () = assert!(
    TASK_ROW_ALIGN.is_multiple_of(ROW_ALIGN) && TASK_ROW_ALIGN.is_multiple_of(crate::quant::panels::PANEL),
    "task rows align with both"
);
/// Tokens per parallel task; a multiple of every ISA's tile width (`MR`). Larger `m` is split
/// into more tasks.
const TOKENS_PER_TASK: usize = 128;
/// Lower bound on weight rows per task, so that scheduling overhead stays small.
const MIN_ROWS_PER_TASK: usize = 16;
/// Tasks per thread to aim for, for load balance.
const TASKS_PER_THREAD: usize = 8;

/// Problem size: `m` tokens, `n` weight rows (outputs), `k` weight columns (inputs).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shape {
    pub(crate) m: usize,
    pub(crate) n: usize,
    pub(crate) k: usize,
}

/// One task: weight rows `r0..r1` against tokens `i0..i1`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Task {
    pub(crate) r0: usize,
    pub(crate) r1: usize,
    pub(crate) i0: usize,
    pub(crate) i1: usize,
}

/// How a call is cut into tasks: blocks of weight rows × blocks of up to [`TOKENS_PER_TASK`]
/// tokens, about [`TASKS_PER_THREAD`] row blocks per thread. The pool hands each thread a
/// contiguous share of the blocks first, so a thread still streams one linear stretch of the
/// matrix, and a thread that finishes early takes blocks from a delayed one instead of waiting.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    rows: usize,
    row_blocks: usize,
    token_blocks: usize,
}

impl Plan {
    pub(crate) fn new(s: Shape, threads: usize) -> Self {
        Self::with_rows(s, Self::rows_per_task(s.n, threads))
    }

    /// Row block size for `rows` weight rows cut into about [`TASKS_PER_THREAD`] blocks per
    /// thread.
    pub(super) fn rows_per_task(rows: usize, threads: usize) -> usize {
        rows.div_ceil(threads.max(1) * TASKS_PER_THREAD).max(MIN_ROWS_PER_TASK).next_multiple_of(TASK_ROW_ALIGN)
    }

    /// Row blocks of `rows` (> 0) weight rows.
    pub(super) fn with_rows(s: Shape, rows: usize) -> Self {
        Plan { rows, row_blocks: s.n.div_ceil(rows), token_blocks: s.m.div_ceil(TOKENS_PER_TASK) }
    }

    pub(crate) fn tasks(&self) -> usize {
        self.row_blocks * self.token_blocks
    }

    pub(crate) fn task(&self, t: usize, s: Shape) -> Task {
        let (rb, tb) = (t % self.row_blocks, t / self.row_blocks);
        Task {
            r0: rb * self.rows,
            r1: ((rb + 1) * self.rows).min(s.n),
            i0: tb * TOKENS_PER_TASK,
            i1: ((tb + 1) * TOKENS_PER_TASK).min(s.m),
        }
    }
}
