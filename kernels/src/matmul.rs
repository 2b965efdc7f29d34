//! Dense matmul against a checkpoint-layout weight: `y (m, rows) = x (m, cols) · wᵀ`.
//!
//! [`matmul_ref`] defines the result: for every output, a sequential f32 sum over `cols`.
//! [`matmul`] computes the same sums in a different order (SIMD lanes, several accumulators,
//! pairwise lane reduction), so results agree to f32 rounding, not bit for bit.
//!
//! The fast kernel splits the output into tasks of (a block of weight rows) × (a block of up to
//! 128 tokens); each task writes only its own `y[i][r]` entries. Inside a task the AVX2 path
//! runs a register-tiled micro-kernel — 4 token rows × 3 weight rows (all 16 ymm registers), or
//! 1 × 8 for decode — so each weight vector is loaded (and widened from bf16 with a
//! 16-bit shift) once per tile and reused across the tile's token rows. Tasks walk their weight
//! rows in L2-sized sub-blocks so that every token tile reuses them from cache. The AVX-512 path
//! (`avx512.rs`, opt-in via [`Isa::Avx512`]) is the same design with 16 lanes, 4 × 4 tiles and
//! masked column tails; on double-pumped AVX-512 cores (AMD Zen 4) it measures about the same as
//! AVX2.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

use rayon::prelude::*;

use crate::error::{KernelError, check_len, mul};
use crate::isa::Isa;
use crate::pool::CpuPool;
use crate::simd::{self, Elem, SharedOut};
use crate::weights::{WeightData, WeightMatrix};

/// Token rows per micro-kernel tile (prefill).
#[cfg(target_arch = "x86_64")]
pub(crate) const MR: usize = 4;
/// Weight rows per micro-kernel tile (prefill).
#[cfg(target_arch = "x86_64")]
pub(crate) const NR: usize = 3;
/// Weight rows per tile when `m == 1` (decode GEMV).
#[cfg(target_arch = "x86_64")]
pub(crate) const NR_GEMV: usize = 8;
/// Row blocks are multiples of this (a multiple of both [`NR`] and [`NR_GEMV`]).
pub(crate) const ROW_ALIGN: usize = 24;
/// Tokens per parallel task; a multiple of [`MR`]. Larger `m` is split into more tasks.
const TOKENS_PER_TASK: usize = 128;
/// Lower bound on weight rows per task, so that scheduling overhead stays small.
const MIN_ROWS_PER_TASK: usize = 16;
/// Tasks per thread to aim for, for load balance.
const TASKS_PER_THREAD: usize = 8;

/// Checks `x`, `y` and `w` against `m` and the weight shape.
fn check(kernel: &'static str, x: &[f32], m: usize, w: &WeightMatrix, y: &[f32]) -> Result<(), KernelError> {
    check_len(kernel, "weight data", w.data.len(), mul(kernel, w.rows, w.cols)?)?;
    check_len(kernel, "x", x.len(), mul(kernel, m, w.cols)?)?;
    check_len(kernel, "y", y.len(), mul(kernel, m, w.rows)?)
}

/// Reference: `y[i][r] = Σ_k x[i][k] · w[r][k]`, summed sequentially in f32.
pub fn matmul_ref(x: &[f32], m: usize, w: &WeightMatrix, y: &mut [f32]) -> Result<(), KernelError> {
    check("matmul_ref", x, m, w, y)?;
    let shape = Shape { m, n: w.rows, k: w.cols };
    match w.data {
        WeightData::F32(d) => reference(x, d, shape, y),
        WeightData::Bf16(d) => reference(x, d, shape, y),
    }
    Ok(())
}

fn reference<E: Elem>(x: &[f32], w: &[E], s: Shape, y: &mut [f32]) {
    for i in 0..s.m {
        let xi = &x[i * s.k..(i + 1) * s.k];
        for r in 0..s.n {
            let wr = &w[r * s.k..(r + 1) * s.k];
            let mut acc = 0.0f32;
            for (a, b) in xi.iter().zip(wr) {
                acc += a * b.to_f32();
            }
            y[i * s.n + r] = acc;
        }
    }
}

/// Fast `y (m, w.rows) = x (m, w.cols) · wᵀ`, multi-threaded on `pool` with its SIMD path.
pub fn matmul(pool: &CpuPool, x: &[f32], m: usize, w: &WeightMatrix, y: &mut [f32]) -> Result<(), KernelError> {
    check("matmul", x, m, w, y)?;
    if w.cols == 0 {
        y.fill(0.0);
        return Ok(());
    }
    if m == 0 || w.rows == 0 {
        return Ok(());
    }
    let shape = Shape { m, n: w.rows, k: w.cols };
    match w.data {
        WeightData::F32(d) => run(pool, x, d, shape, y),
        WeightData::Bf16(d) => run(pool, x, d, shape, y),
    }
    Ok(())
}

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

/// Weight rows per task: about [`TASKS_PER_THREAD`] row blocks per thread, at least
/// [`MIN_ROWS_PER_TASK`], rounded up to a multiple of the tile width.
fn rows_per_task(n: usize, threads: usize) -> usize {
    let per = n.div_ceil(threads.max(1) * TASKS_PER_THREAD).max(MIN_ROWS_PER_TASK);
    per.next_multiple_of(ROW_ALIGN)
}

fn run<E: Elem>(pool: &CpuPool, x: &[f32], w: &[E], s: Shape, y: &mut [f32]) {
    let rows = rows_per_task(s.n, pool.threads());
    let row_blocks = s.n.div_ceil(rows);
    let token_blocks = s.m.div_ceil(TOKENS_PER_TASK);
    let isa = pool.isa();
    let out = SharedOut::new(y);
    pool.install(|| {
        (0..row_blocks * token_blocks).into_par_iter().for_each_init(Vec::new, |buf, t| {
            let (rb, tb) = (t % row_blocks, t / row_blocks);
            let task = Task {
                r0: rb * rows,
                r1: ((rb + 1) * rows).min(s.n),
                i0: tb * TOKENS_PER_TASK,
                i1: ((tb + 1) * TOKENS_PER_TASK).min(s.m),
            };
            match isa {
                // SAFETY (both SIMD arms): a pool only holds an ISA the CPU supports; tasks
                // cover disjoint (token, weight row) rectangles, so their writes through
                // `out` never overlap, and nothing reads `y` until `install` returns.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => unsafe { avx512::task(x, w, s, task, &out) },
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2Fma => unsafe { avx2::task(x, w, s, task, &out) },
                #[cfg(not(target_arch = "x86_64"))]
                Isa::Avx512 | Isa::Avx2Fma => scalar_task(x, w, s, task, &out, buf),
                Isa::Scalar => scalar_task(x, w, s, task, &out, buf),
            }
        });
    });
}

/// Portable task: widen each weight row once, then dot it with every token row of the task.
fn scalar_task<E: Elem>(x: &[f32], w: &[E], s: Shape, t: Task, out: &SharedOut, buf: &mut Vec<f32>) {
    for r in t.r0..t.r1 {
        let wr = E::widen(&w[r * s.k..(r + 1) * s.k], buf);
        for i in t.i0..t.i1 {
            let v = simd::dot(&x[i * s.k..(i + 1) * s.k], wr);
            // SAFETY: (i, r) lies in this task's rectangle, which no other task writes.
            unsafe { out.write(i * s.n + r, v) };
        }
    }
}
