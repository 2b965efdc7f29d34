//! Dense matmul against a checkpoint-layout weight: `y (m, rows) = x (m, cols) · wᵀ`.
//!
//! [`matmul_ref`] defines the result: for every output, a sequential f32 sum over `cols`.
//! [`matmul`] computes the same sums in a different order (SIMD lanes, several accumulators,
//! pairwise lane reduction), so results agree to f32 rounding, not bit for bit.
//!
//! The fast kernel splits the output into tasks of (a block of weight rows) × (a block of up to
//! 128 tokens); each task writes only its own `y[i][r]` entries. Inside a task the AVX2 path
//! runs a register-tiled micro-kernel — 4 token rows × 3 weight rows (all 16 ymm registers) — so
//! each weight vector is loaded (and widened from bf16 with a 16-bit shift) once per tile and
//! reused across the tile's token rows; a single token (decode) instead walks the rows in memory
//! order, one row at a time. Tasks walk their weight rows in L2-sized sub-blocks so that every
//! token tile reuses them from cache. Every task goes through one dispatch (`run_task`) on the
//! path that `path.rs` alone decides from the weight format, the token count and the ISA:
//! block-quantised weights have their own kernels (`quantized.rs`); on [`Isa::Avx512Bf16`]
//! decode-sized bf16 matmuls, and quantised ones of 2 to 8 tokens, use bf16 dot products
//! (`bf16_dot.rs`, `quantized_bf16.rs`), or for Q8_0, where the pool allows 8-bit inputs
//! ([`InputRounding`]), integer ones (`quantized_vnni.rs`); Q8_0 against one token on every SIMD
//! ISA, two on that one unless 8-bit inputs are allowed, and up to 8 where there are no bf16 dot
//! products takes 16-bit integer dot products (`quantized_i16.rs`), and in row panels
//! ([`crate::quant::panels`], how the CPU backend holds Q8_0 on the ISAs with VNNI) 16 rows per
//! vector at any token count (`quantized_panels.rs`). The 16-lane ISAs without bf16 dot products
//! ([`Isa::has_wide_f32_tiles`]) run the same tile design with 4 × 4 tiles and masked column
//! tails (`avx512.rs`), a packed GEMM for prefill (`avx512_packed.rs`), and batched bf16 decode
//! with the weights widened in pairs (`bf16_pairs.rs`). [`matmul_many`] runs several weights
//! that share an input as one launch.

/// Defines `task` (and its helpers) in an ISA module from the module's `tile` micro-kernel and
/// its `MR`, `NR` constants and its `dot_row` GEMV: the blocking logic is the same for every ISA, only the
/// enabled target features, the tile, and whether a lone token's weight stream is prefetched
/// line by line (`prefetch::stream_ahead`) differ.
#[cfg(target_arch = "x86_64")]
macro_rules! define_task {
    ($features:literal, stream_prefetch: $stream:literal) => {
        /// Runs one task.
        ///
        /// # Safety
        /// The CPU must support the module's features, and no other thread may access the `y`
        /// entries of this task's rectangle while it runs.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn task<E: Elem>(x: &[f32], w: &[E], s: Shape, t: Task, out: &SharedOut) {
            // Walk the task's weight rows in sub-blocks that stay in L2 while every token tile of the
            // task streams past them; as many rows after the sub-block as it holds are prefetched
            // while it is worked on.
            let sub = (W_BLOCK_BYTES / (s.k * std::mem::size_of::<E>())).max(1).next_multiple_of(ROW_ALIGN);
            let mut r0 = t.r0;
            while r0 < t.r1 {
                let r1 = (r0 + sub).min(t.r1);
                // The rows after the task's last sub-block belong to a task that runs soon, on
                // this core or the other (then from the shared L3). No more are prefetched than the
                // sub-block holds: a task is often one short sub-block, and a full one ahead of it
                // cost batch-8 bf16 decode on the AVX-512 tiles 7–10% (Ice Lake, bench engine).
                let ahead = r1 - r0;
                let next = &w[r1 * s.k..(r1 + ahead).min(s.n) * s.k];
                // SAFETY: same contract as this function; the sub-block lies inside the task.
                unsafe { sub_block(x, w, 0, s, Task { r0, r1, ..t }, next, out) };
                r0 = r1;
            }
        }

        /// All token rows of `t` against its weight rows, prefetching `next` along the way.
        /// Weight row `r` is `w[(r - base) * k..]`: `w` may hold only the rows from `base` on.
        ///
        /// # Safety
        /// As for [`task`]; also `base <= t.r0`.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn sub_block<E: Elem>(
            x: &[f32],
            w: &[E],
            base: usize,
            s: Shape,
            t: Task,
            next: &[E],
            out: &SharedOut,
        ) {
            // SAFETY (every call below): same contract as this function.
            if t.i1 - t.i0 == 1 {
                // One token: walk the weight rows in memory order, one row at a time, so the
                // hardware prefetcher sees a single linear stream.
                let xi = &x[t.i0 * s.k..(t.i0 + 1) * s.k];
                let end = w.as_ptr_range().end.cast::<u8>();
                for r in t.r0..t.r1 {
                    let row = &w[(r - base) * s.k..(r - base + 1) * s.k];
                    if $stream {
                        super::prefetch::stream_ahead(row, end);
                    }
                    let v = dot_row(xi, row);
                    // SAFETY: (t.i0, r) is inside this task's rectangle.
                    unsafe { out.write(t.i0 * s.n + r, v) };
                }
                return;
            }
            let strips = (t.i1 - t.i0).div_ceil(MR);
            let mut pf = Prefetcher::new(next, strips * (t.r1 - t.r0).div_ceil(NR));
            let mut i = t.i0;
            while i + MR <= t.i1 {
                unsafe { strip::<E, MR, NR>(x, w, base, s, t, i, &mut pf, out) };
                i += MR;
            }
            match t.i1 - i {
                1 => unsafe { strip::<E, 1, NR>(x, w, base, s, t, i, &mut pf, out) },
                2 => unsafe { strip::<E, 2, NR>(x, w, base, s, t, i, &mut pf, out) },
                3 => unsafe { strip::<E, 3, NR>(x, w, base, s, t, i, &mut pf, out) },
                _ => {}
            }
        }

        /// Token rows `i..i + M` against all of the task's weight rows, `N` at a time (weight
        /// rows counted from `base`, as in [`sub_block`]).
        ///
        /// # Safety
        /// As for [`sub_block`]; also `i + M <= t.i1`.
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn strip<E: Elem, const M: usize, const N: usize>(
            x: &[f32],
            w: &[E],
            base: usize,
            s: Shape,
            t: Task,
            i: usize,
            pf: &mut Prefetcher,
            out: &SharedOut,
        ) {
            let k = s.k;
            let mut xr: [&[f32]; M] = [&[]; M];
            for (a, row) in xr.iter_mut().enumerate() {
                *row = &x[(i + a) * k..(i + a + 1) * k];
            }
            let mut r = t.r0;
            while r < t.r1 {
                if r + N <= t.r1 {
                    let mut wr: [&[E]; N] = [&[]; N];
                    for (b, row) in wr.iter_mut().enumerate() {
                        *row = &w[(r - base + b) * k..(r - base + b + 1) * k];
                    }
                    pf.step();
                    let sums = tile(&xr, &wr, k);
                    for (a, sa) in sums.iter().enumerate() {
                        for (b, v) in sa.iter().enumerate() {
                            // SAFETY: (i + a, r + b) is inside this task's rectangle.
                            unsafe { out.write((i + a) * s.n + r + b, *v) };
                        }
                    }
                    r += N;
                } else {
                    let sums = tile(&xr, &[&w[(r - base) * k..(r - base + 1) * k]], k);
                    for (a, sa) in sums.iter().enumerate() {
                        // SAFETY: (i + a, r) is inside this task's rectangle.
                        unsafe { out.write((i + a) * s.n + r, sa[0]) };
                    }
                    r += 1;
                }
            }
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use define_task;

/// Bytes of weight rows a task works on at a time (kept in L2).
#[cfg(target_arch = "x86_64")]
pub(crate) const W_BLOCK_BYTES: usize = 256 * 1024;

/// How far ahead of the block being multiplied the decode kernels for block-quantised weights
/// (`quantized_avx2`, `quantized_vnni`) prefetch the weight stream when several token rows share
/// a row: a row then takes long enough that the hardware prefetcher alone leaves the weight
/// loads waiting on memory.
#[cfg(target_arch = "x86_64")]
const QUANT_PREFETCH_AHEAD_BYTES: usize = 2048;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod prefetch;
#[cfg(target_arch = "x86_64")]
use prefetch::Prefetcher;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512_packed;
#[cfg(target_arch = "x86_64")]
mod bf16_dot;
#[cfg(target_arch = "x86_64")]
mod bf16_pairs;
mod path;
mod plan;
mod quantized;
#[cfg(target_arch = "x86_64")]
mod quantized_avx2;
#[cfg(target_arch = "x86_64")]
mod quantized_bf16;
#[cfg(target_arch = "x86_64")]
mod quantized_i16;
#[cfg(target_arch = "x86_64")]
mod quantized_panels;
#[cfg(target_arch = "x86_64")]
mod quantized_vnni;

pub use path::InputRounding;
#[cfg(target_arch = "x86_64")]
use path::{Path, path};
pub(crate) use plan::{Plan, Shape, Task};

use crate::error::{KernelError, check_len, mul};
use crate::isa::Isa;
use crate::pool::CpuPool;
use crate::profile::{self, KernelClass};
use crate::simd::{self, Elem, SharedOut};
use crate::weights::{WeightData, WeightMatrix};

/// Token rows per micro-kernel tile (prefill).
#[cfg(target_arch = "x86_64")]
pub(crate) const MR: usize = 4;
/// Weight rows per micro-kernel tile (prefill).
#[cfg(target_arch = "x86_64")]
pub(crate) const NR: usize = 3;
/// Most token rows a matmul has to count as decode-sized: bandwidth-bound, and served by the
/// row-by-row drivers of the quantised and bf16 dot-product paths (and by its own profile class).
pub(crate) const DECODE_MAX_TOKENS: usize = 8;
/// Row blocks are multiples of this (a multiple of every ISA's `NR`).
pub(crate) const ROW_ALIGN: usize = 24;

/// Checks `x`, `y` and `w` against `m` and the weight shape.
fn check(kernel: &'static str, x: &[f32], m: usize, w: &WeightMatrix, y: &[f32]) -> Result<(), KernelError> {
    w.check(kernel)?;
    check_len(kernel, "x", x.len(), mul(kernel, m, w.cols)?)?;
    check_len(kernel, "y", y.len(), mul(kernel, m, w.rows)?)
}

/// Reference: `y[i][r] = Σ_k x[i][k] · w[r][k]`, summed sequentially in f32, with each weight
/// widened exactly (block formats as ggml dequantises them, see [`crate::quant`]).
pub fn matmul_ref(x: &[f32], m: usize, w: &WeightMatrix, y: &mut [f32]) -> Result<(), KernelError> {
    check("matmul_ref", x, m, w, y)?;
    let mut row = vec![0.0f32; w.cols];
    for r in 0..w.rows {
        w.row_to_f32(r, &mut row);
        for i in 0..m {
            let xi = &x[i * w.cols..(i + 1) * w.cols];
            let mut acc = 0.0f32;
            for (a, b) in xi.iter().zip(&row) {
                acc += a * b;
            }
            y[i * w.rows + r] = acc;
        }
    }
    Ok(())
}

/// Fast `y (m, w.rows) = x (m, w.cols) · wᵀ`, multi-threaded on `pool` with its SIMD path, the
/// token rows rounded at most as the pool allows ([`CpuPool::input_rounding`]).
pub fn matmul(pool: &CpuPool, x: &[f32], m: usize, w: &WeightMatrix, y: &mut [f32]) -> Result<(), KernelError> {
    matmul_with(pool, x, m, w, y, InputRounding::Int8)
}

/// [`matmul`] with the token rows rounded at most as `rounding` and the pool allow.
pub fn matmul_with(
    pool: &CpuPool,
    x: &[f32],
    m: usize,
    w: &WeightMatrix,
    y: &mut [f32],
    rounding: InputRounding,
) -> Result<(), KernelError> {
    check("matmul", x, m, w, y)?;
    let class = if m <= DECODE_MAX_TOKENS { KernelClass::MatmulDecode } else { KernelClass::MatmulPrefill };
    let _timed = profile::scope(class, w.bytes() + 4 * (x.len() + y.len()), 2 * m * w.rows * w.cols);
    if w.cols == 0 {
        y.fill(0.0);
        return Ok(());
    }
    if m == 0 || w.rows == 0 {
        return Ok(());
    }
    let input = Input::new(pool.isa(), x, m, [w], rounding.min(pool.input_rounding()));
    run_planned(pool, &input, w, y);
    Ok(())
}

/// `y = input · wᵀ` in the tasks of `w`'s own plan, for a checked call of at least one token, one
/// weight row and one column; `input` was made by [`Input::new`] on `pool`'s ISA with `w` among its
/// weights.
fn run_planned(pool: &CpuPool, input: &Input, w: &WeightMatrix, y: &mut [f32]) {
    let shape = Shape { m: input.x.len() / w.cols, n: w.rows, k: w.cols };
    let plan = Plan::new(shape, pool.threads());
    let isa = pool.isa();
    let out = SharedOut::new(y);
    pool.run(plan.tasks(), |t| {
        // SAFETY: a pool only holds an ISA the CPU supports; tasks cover disjoint (token, weight
        // row) rectangles, so their writes through `out` never overlap, and nothing reads `y`
        // until `run` returns; `input` was made for this `x`, ISA and weight.
        unsafe { run_task(isa, input, &w.data, shape, plan.task(t, shape), &out) };
    });
}

/// `ys[j] = x · w_jᵀ` for weights that share their input `x` (`m` rows), such as a layer's Q, K
/// and V projections or its gate and up projections (token rows rounded as [`matmul`] does).
///
/// A decode-sized call (at most 8 tokens, `DECODE_MAX_TOKENS`) is one pool launch whose row blocks
/// are cut across all the weights in order: each thread streams one stretch of them, and the
/// launch and its closing wait are paid once instead of once per weight. Every output gets the
/// same values as from [`matmul`] with the same weight. Larger calls are compute-bound and run one
/// launch per weight as [`matmul`] does, but share one preparation of the input (the 16-bit
/// quantisation for Q8_0 in row panels is serial, and about as long as a small weight's matmul).
pub fn matmul_many(
    pool: &CpuPool,
    x: &[f32],
    m: usize,
    targets: &mut [(&WeightMatrix, &mut [f32])],
) -> Result<(), KernelError> {
    for (w, y) in targets.iter() {
        check("matmul_many", x, m, w, y)?;
    }
    if m == 0 || x.is_empty() {
        for (w, y) in targets.iter_mut() {
            matmul(pool, x, m, w, y)?;
        }
        return Ok(());
    }
    if m > DECODE_MAX_TOKENS {
        let weights: Vec<&WeightMatrix> = targets.iter().map(|(w, _)| *w).collect();
        let mut input = None;
        for (w, y) in targets.iter_mut() {
            // Each weight is one profiled call, as from `matmul`; the first also prepares the input.
            let bytes = w.bytes() + 4 * (x.len() + y.len());
            let _timed = profile::scope(KernelClass::MatmulPrefill, bytes, 2 * m * w.rows * w.cols);
            let input = input
                .get_or_insert_with(|| Input::new(pool.isa(), x, m, weights.iter().copied(), pool.input_rounding()));
            if w.rows > 0 {
                run_planned(pool, input, w, y);
            }
        }
        return Ok(());
    }
    let (bytes, flops) = targets
        .iter()
        .fold((4 * x.len(), 0), |(b, f), (w, y)| (b + w.bytes() + 4 * y.len(), f + 2 * m * w.rows * w.cols));
    let _timed = profile::scope(KernelClass::MatmulDecode, bytes, flops);
    let threads = pool.threads();
    let total_rows: usize = targets.iter().map(|(w, _)| w.rows).sum();
    let rows_per_task = Plan::rows_per_task(total_rows, threads);
    // Each weight's tasks, numbered on from the previous weight's.
    let mut first_task = 0;
    let segments: Vec<(usize, Shape, Plan)> = targets
        .iter()
        .map(|(w, _)| {
            let shape = Shape { m, n: w.rows, k: w.cols };
            let plan = Plan::with_rows(shape, rows_per_task);
            let first = first_task;
            first_task += plan.tasks();
            (first, shape, plan)
        })
        .collect();
    let isa = pool.isa();
    let input = Input::new(isa, x, m, targets.iter().map(|(w, _)| *w), pool.input_rounding());
    let outs: Vec<(&WeightData, SharedOut)> = targets.iter_mut().map(|(w, y)| (&w.data, SharedOut::new(y))).collect();
    pool.run(first_task, |g| {
        let j = segments.partition_point(|(first, ..)| *first <= g) - 1;
        let (first, shape, plan) = segments[j];
        let (w, out) = &outs[j];
        // SAFETY: as in `matmul`; tasks of different weights write different outputs.
        unsafe { run_task(isa, &input, w, shape, plan.task(g - first, shape), out) };
    });
    Ok(())
}

/// A call's token rows, plus what the call's paths read instead: their bf16 rounding (bf16 dot
/// products), their split into even and odd columns (`bf16_pairs`), and their 8-bit or 16-bit
/// quantisation (the integer dot products).
struct Input<'a> {
    x: &'a [f32],
    #[cfg(target_arch = "x86_64")]
    rounding: InputRounding,
    #[cfg(target_arch = "x86_64")]
    bf16: Vec<u16>,
    #[cfg(target_arch = "x86_64")]
    pairs: Vec<f32>,
    #[cfg(target_arch = "x86_64")]
    int8: quantized_vnni::QuantInput,
    #[cfg(target_arch = "x86_64")]
    int16: quantized_i16::QuantRows16,
}

impl<'a> Input<'a> {
    fn new<'w>(
        isa: Isa,
        x: &'a [f32],
        m: usize,
        weights: impl IntoIterator<Item = &'w WeightMatrix<'w>>,
        rounding: InputRounding,
    ) -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let (mut needs_bf16, mut needs_pairs, mut needs_int8, mut needs_int16) = (false, false, false, false);
            for w in weights {
                match path(isa, &w.data, m, rounding) {
                    Path::Bf16Dot => needs_bf16 = true,
                    Path::Bf16Pairs => needs_pairs = true,
                    Path::Int8Dot => needs_int8 = true,
                    Path::Int16Dot | Path::Int16Panels => needs_int16 = true,
                    Path::F32 => {}
                }
            }
            // SAFETY (both): the bf16 path is taken only on the AVX-512 BF16 ISA and the 8-bit one
            // only on ISAs with VNNI, which pools hold only where the CPU has them; the 8-bit one
            // only for Q8_0 weights, whose rows are whole blocks, and at most 8 rows.
            let bf16 = if needs_bf16 { unsafe { bf16_dot::round(x) } } else { Vec::new() };
            // SAFETY: taken only on the ISAs with the 16-lane tiles, which have AVX-512 F.
            let pairs = if needs_pairs { unsafe { bf16_pairs::split_pairs(x, m, x.len() / m) } } else { Vec::new() };
            let int8 =
                if needs_int8 { unsafe { quantized_vnni::quantize(x, m, x.len() / m) } } else { Default::default() };
            // SAFETY: taken only on SIMD ISAs (AVX2 and up), for rows of Q8_0 blocks' width.
            let int16 =
                if needs_int16 { unsafe { quantized_i16::quantize(x, x.len() / m) } } else { Default::default() };
            Input { x, rounding, bf16, pairs, int8, int16 }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (isa, m, weights.into_iter(), rounding);
            Input { x }
        }
    }
}

/// One task of a call against `w`, with the path its format and the ISA select.
///
/// # Safety
/// `isa` must be supported; `input` was made by [`Input::new`] for this call; no other thread
/// touches the task's `out` entries while it runs.
unsafe fn run_task(isa: Isa, input: &Input, w: &WeightData, s: Shape, t: Task, out: &SharedOut) {
    let x = input.x;
    #[cfg(target_arch = "x86_64")]
    match (path(isa, w, s.m, input.rounding), *w) {
        // SAFETY (every call in these arms): the caller's contract; `path` chooses the bf16 one
        // on the AVX-512 BF16 ISA only, the pairs one on the 16-lane ISAs only, the 8-bit and
        // panel ones on ISAs with VNNI only, the 16-bit one on any AVX2 ISA; `Input::new`
        // prepared the rows each reads.
        (Path::Bf16Dot, WeightData::Bf16(d)) => {
            return unsafe { bf16_dot::rows(&input.bf16, |r| &d[r * s.k..(r + 1) * s.k], s, t, out) };
        }
        (Path::Bf16Pairs, WeightData::Bf16(d)) => return unsafe { bf16_pairs::rows(&input.pairs, d, s, t, out) },
        (Path::Bf16Dot, WeightData::Q8_0(b)) => return unsafe { quant_bf16_task(&input.bf16, b, s, t, out) },
        (Path::Bf16Dot, WeightData::Q4_0(b)) => return unsafe { quant_bf16_task(&input.bf16, b, s, t, out) },
        (Path::Bf16Dot, WeightData::Q4_1(b)) => return unsafe { quant_bf16_task(&input.bf16, b, s, t, out) },
        (Path::Int8Dot, WeightData::Q8_0(b)) => return unsafe { quantized_vnni::rows(&input.int8, b, s, t, out) },
        (Path::Int16Dot, WeightData::Q8_0(b)) => return unsafe { quantized_i16::rows(&input.int16, b, s, t, out) },
        (Path::Int16Panels, WeightData::Q8_0Panels(b)) => {
            return unsafe {
                quantized_panels::task(&input.int16, b, s, t, quantized_panels::Tuning::for_isa(isa), out)
            };
        }
        // `path` gives f32 and f16 weights neither dot path, and the 8-bit one only Q8_0.
        _ => {}
    }
    // SAFETY (every arm): the caller's contract.
    unsafe {
        match *w {
            WeightData::F32(d) => elem_task(isa, x, d, s, t, out),
            WeightData::Bf16(d) => elem_task(isa, x, d, s, t, out),
            WeightData::F16(d) => elem_task(isa, x, d, s, t, out),
            WeightData::Q8_0(b) => quantized::task(isa, x, b, s, t, out),
            WeightData::Q8_0Panels(b) => quantized::panels_task(isa, x, b, s, t, out),
            WeightData::Q4_0(b) => quantized::task(isa, x, b, s, t, out),
            WeightData::Q4_1(b) => quantized::task(isa, x, b, s, t, out),
        }
    }
}

/// One decode-sized task against block-quantised weights on the AVX-512 BF16 path.
///
/// # Safety
/// As for [`run_task`], on [`Isa::Avx512Bf16`]; `xb` is the call's bf16-rounded input.
#[cfg(target_arch = "x86_64")]
unsafe fn quant_bf16_task<B: quantized_bf16::DequantBf16>(xb: &[u16], w: &[B], s: Shape, t: Task, out: &SharedOut) {
    let per_row = s.k / crate::quant::QK;
    let row = |r: usize| quantized_bf16::QuantRow(&w[r * per_row..(r + 1) * per_row]);
    // SAFETY: the caller's contract.
    unsafe { bf16_dot::rows(xb, row, s, t, out) }
}

/// One task against plain (f32, bf16, f16) weights: the pool ISA's tile kernels.
///
/// # Safety
/// As for [`run_task`].
unsafe fn elem_task<E: Elem>(isa: Isa, x: &[f32], w: &[E], s: Shape, t: Task, out: &SharedOut) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY (every call): the caller's contract; each branch's ISAs include its kernels' features.
    unsafe {
        if isa.has_wide_f32_tiles() {
            return if t.i1 - t.i0 > DECODE_MAX_TOKENS {
                avx512_packed::rows(x, w, 0, s, t, out)
            } else {
                avx512::task(x, w, s, t, out)
            };
        }
        if isa.has_avx2() {
            return avx2::task(x, w, s, t, out);
        }
    }
    scalar_rows(x, w, 0, s, t, out)
}

/// The task's rectangle against f32 weight rows `w` that start at row `base` (`base <= t.r0`),
/// with the pool's tile kernels and no prefetching: for rows just widened into a buffer.
///
/// # Safety
/// `isa` must be supported; no other thread may touch the task's `out` entries meanwhile.
unsafe fn f32_rows(isa: Isa, x: &[f32], w: &[f32], base: usize, s: Shape, t: Task, out: &SharedOut) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY (every call): the caller's contract; each branch's ISAs include its kernels' features.
    unsafe {
        if isa.has_wide_f32_tiles() {
            return if t.i1 - t.i0 > DECODE_MAX_TOKENS {
                avx512_packed::rows(x, w, base, s, t, out)
            } else {
                avx512::sub_block(x, w, base, s, t, &[], out)
            };
        }
        if isa.has_avx2() {
            return avx2::sub_block(x, w, base, s, t, &[], out);
        }
    }
    scalar_rows(x, w, base, s, t, out)
}

/// Portable task: widen each weight row once (rows counted from `base`), then dot it with every
/// token row of the task.
fn scalar_rows<E: Elem>(x: &[f32], w: &[E], base: usize, s: Shape, t: Task, out: &SharedOut) {
    let mut buf = Vec::new();
    for r in t.r0..t.r1 {
        let wr = E::widen(&w[(r - base) * s.k..(r - base + 1) * s.k], &mut buf);
        for i in t.i0..t.i1 {
            let v = simd::dot(&x[i * s.k..(i + 1) * s.k], wr);
            // SAFETY: (i, r) lies in this task's rectangle, which no other task writes.
            unsafe { out.write(i * s.n + r, v) };
        }
    }
}
