//! Attention of query tokens over a paged KV cache (one layer).
//!
//! The cache is `(num_blocks, n_kv_heads, block_size, head_dim)` for K and for V: within a block,
//! each KV head's rows are one contiguous run, so reading a head's context streams whole
//! `block_size * head_dim` runs rather than every `n_kv_heads`-th row. A query token attends to
//! its sequence's positions `[window_start, context_len)`; position `p` lives in physical block
//! `block_table[p / block_size]`, slot `p % block_size` ([`PagedKvLayer::offset`]). Scores are scaled by
//! `1 / sqrt(head_dim)`; query head `h` reads KV head `h / (n_heads / n_kv_heads)` (GQA).
//! Causality is the caller's job: it sets `context_len` per query token. Everything the kernels
//! index is validated first, so bad input is a [`KernelError`], never a panic.
//!
//! Cache entries are f32 or bf16 ([`Elem`]); they are widened to f32 as they are read, and all
//! arithmetic is in f32 — except on the AVX-512 BF16 ISA over a bf16 cache, where a pool whose
//! input rounding allows bf16 (rounding [`Bf16`](crate::matmul::InputRounding::Bf16), the
//! default) rounds the query and the softmax weights to bf16 and multiplies them with the cache
//! entries as they are (`bf16_dot`), still summing in f32.

use std::cell::RefCell;

#[cfg(target_arch = "x86_64")]
mod bf16_dot;
mod chunks;
#[cfg(target_arch = "x86_64")]
mod x86;

use crate::profile::{self, KernelClass};

use crate::error::{KernelError, check_len, mul};
use crate::isa::Isa;
#[cfg(target_arch = "x86_64")]
use crate::matmul::InputRounding;
use crate::pool::CpuPool;
use crate::simd::Elem;
use crate::softmax::{exp_shifted_isa, softmax_ref};

/// One layer's paged KV cache, with entries of type `E` (f32 or bf16).
#[derive(Clone, Copy, Debug)]
pub struct PagedKvLayer<'a, E = f32> {
    /// Keys, `(num_blocks, n_kv_heads, block_size, head_dim)`.
    pub k: &'a [E],
    /// Values, same layout as `k`.
    pub v: &'a [E],
    /// Positions per block.
    pub block_size: usize,
    /// KV heads.
    pub n_kv_heads: usize,
    /// Per-head dimension.
    pub head_dim: usize,
}

impl<E> PagedKvLayer<'_, E> {
    /// Index in `k` and `v` of the row of (physical `block`, `slot` in it, KV head `kv_head`).
    pub fn offset(&self, block: usize, slot: usize, kv_head: usize) -> usize {
        row_offset(self.n_kv_heads, self.block_size, self.head_dim, block, slot, kv_head)
    }
}

/// The cache layout's one definition: index of the row of (`block`, `slot`, `kv_head`) in a
/// `(num_blocks, n_kv_heads, block_size, head_dim)` array.
#[inline]
fn row_offset(
    n_kv_heads: usize,
    block_size: usize,
    head_dim: usize,
    block: usize,
    slot: usize,
    kv_head: usize,
) -> usize {
    ((block * n_kv_heads + kv_head) * block_size + slot) * head_dim
}

/// What one query token may see.
#[derive(Clone, Copy, Debug)]
pub struct AttentionQuery<'a> {
    /// Logical block index -> physical block index for this token's sequence.
    pub block_table: &'a [u32],
    /// One past the last visible position (the token's own position + 1 for causal attention).
    pub context_len: usize,
    /// First visible position (0 unless a sliding window cut it).
    pub window_start: usize,
}

/// Validated geometry shared by both kernels.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    n_heads: usize,
    head_dim: usize,
    /// Query heads per KV head.
    group: usize,
    block_size: usize,
    n_kv_heads: usize,
    scale: f32,
}

impl Geometry {
    /// Offset of (position `p`, KV head `kvh`) in `k`/`v`; `p` must have been validated.
    #[inline]
    fn offset(&self, table: &[u32], p: usize, kvh: usize) -> usize {
        let block = table[p / self.block_size] as usize;
        row_offset(self.n_kv_heads, self.block_size, self.head_dim, block, p % self.block_size, kvh)
    }

    /// Appends the offsets of KV head `kvh` at every visible position of `qr`, in order: the
    /// same values as [`Geometry::offset`], one block-table lookup (and division) per block
    /// rather than per position. The query must have been validated.
    fn offsets_into(&self, qr: &AttentionQuery, kvh: usize, out: &mut Vec<usize>) {
        let mut p = qr.window_start;
        while p < qr.context_len {
            let slot = p % self.block_size;
            let run = (self.block_size - slot).min(qr.context_len - p);
            let first = self.offset(qr.block_table, p, kvh);
            out.extend((0..run).map(|j| first + j * self.head_dim));
            p += run;
        }
    }
}

fn validate<E>(
    kernel: &'static str,
    q: &[f32],
    queries: &[AttentionQuery],
    kv: &PagedKvLayer<E>,
    n_heads: usize,
    out: &[f32],
) -> Result<Geometry, KernelError> {
    let err = |d: String| KernelError::shape(kernel, d);
    if kv.block_size == 0 || kv.n_kv_heads == 0 || kv.head_dim == 0 || n_heads == 0 {
        return Err(err(format!(
            "block_size {}, n_kv_heads {}, head_dim {}, n_heads {} must all be > 0",
            kv.block_size, kv.n_kv_heads, kv.head_dim, n_heads
        )));
    }
    if !n_heads.is_multiple_of(kv.n_kv_heads) {
        return Err(err(format!("n_heads {n_heads} is not a multiple of n_kv_heads {}", kv.n_kv_heads)));
    }
    let block_stride = mul(kernel, mul(kernel, kv.n_kv_heads, kv.head_dim)?, kv.block_size)?;
    check_len(kernel, "v", kv.v.len(), kv.k.len())?;
    if !kv.k.len().is_multiple_of(block_stride) {
        return Err(err(format!(
            "cache length {} is not a multiple of the block size {block_stride} entries",
            kv.k.len()
        )));
    }
    let num_blocks = kv.k.len() / block_stride;
    let row = mul(kernel, n_heads, kv.head_dim)?;
    let expected = mul(kernel, queries.len(), row)?;
    check_len(kernel, "q", q.len(), expected)?;
    check_len(kernel, "out", out.len(), expected)?;
    for (i, qr) in queries.iter().enumerate() {
        if qr.window_start >= qr.context_len {
            return Err(err(format!("query {i}: window [{}, {}) is empty", qr.window_start, qr.context_len)));
        }
        let (first, last) = (qr.window_start / kv.block_size, (qr.context_len - 1) / kv.block_size);
        let Some(used) = qr.block_table.get(first..=last) else {
            return Err(err(format!(
                "query {i}: context_len {} needs {} blocks, block table has {}",
                qr.context_len,
                last + 1,
                qr.block_table.len()
            )));
        };
        if let Some(b) = used.iter().find(|&&b| b as usize >= num_blocks) {
            return Err(err(format!("query {i}: block index {b} out of range for {num_blocks} cache blocks")));
        }
    }
    Ok(Geometry {
        n_heads,
        head_dim: kv.head_dim,
        group: n_heads / kv.n_kv_heads,
        block_size: kv.block_size,
        n_kv_heads: kv.n_kv_heads,
        scale: 1.0 / (kv.head_dim as f32).sqrt(),
    })
}

/// Reference paged attention: `q` and `out` are `(queries.len(), n_heads * head_dim)`.
pub fn paged_attention_ref<E: Elem>(
    q: &[f32],
    queries: &[AttentionQuery],
    kv: &PagedKvLayer<E>,
    n_heads: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let g = validate("paged_attention_ref", q, queries, kv, n_heads, out)?;
    let hd = g.head_dim;
    let mut scores = Vec::new();
    for (t, qr) in queries.iter().enumerate() {
        for h in 0..n_heads {
            let kvh = h / g.group;
            let base = (t * n_heads + h) * hd;
            let qh = &q[base..base + hd];
            scores.clear();
            for p in qr.window_start..qr.context_len {
                let off = g.offset(qr.block_table, p, kvh);
                let mut s = 0.0f32;
                for (a, b) in qh.iter().zip(&kv.k[off..off + hd]) {
                    s += a * b.to_f32();
                }
                scores.push(s * g.scale);
            }
            softmax_ref(&mut scores);
            let oh = &mut out[base..base + hd];
            oh.fill(0.0);
            for (p, &w) in (qr.window_start..qr.context_len).zip(&scores) {
                let off = g.offset(qr.block_table, p, kvh);
                for (o, v) in oh.iter_mut().zip(&kv.v[off..off + hd]) {
                    *o += w * v.to_f32();
                }
            }
        }
    }
    Ok(())
}

/// Fast paged attention on `pool`, over query heads grouped by the KV head they share (GQA), so
/// each K and V row is located and loaded once for the whole group; SIMD dot products and value
/// accumulation (bf16 ones where the module docs say); per-thread buffers reused across tasks.
///
/// A query's visible positions are cut into chunks of 256 (`chunks`), each attended to alone and
/// merged in order. When the (query, KV head) pairs are enough to keep every thread busy — at
/// least two per thread — each pair is one task that runs its chunks in turn; otherwise (a short
/// batch, such as a lone sequence with three KV heads on two threads) every chunk is a task and
/// the calling thread merges them after. The chunks and their order, and each head's arithmetic
/// within a chunk, depend only on that query, so results do not depend on what else is in the
/// batch, on the pool, or on which way the work was cut.
pub fn paged_attention<E: Elem>(
    pool: &CpuPool,
    q: &[f32],
    queries: &[AttentionQuery],
    kv: &PagedKvLayer<E>,
    n_heads: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let g = validate("paged_attention", q, queries, kv, n_heads, out)?;
    // Each query reads K and V rows of every KV head over its visible positions.
    let visible: usize = queries.iter().map(|qr| qr.context_len - qr.window_start).sum();
    let _timed = profile::scope(
        KernelClass::Attention,
        visible * 2 * kv.n_kv_heads * kv.head_dim * std::mem::size_of::<E>() + 4 * (q.len() + out.len()),
        visible * n_heads * kv.head_dim * 4,
    );
    let ctx = Ctx {
        isa: pool.isa(),
        #[cfg(target_arch = "x86_64")]
        bf16_cache: if pool.isa() == Isa::Avx512Bf16
            && pool.input_rounding() >= InputRounding::Bf16
            && bf16_dot::takes(g.head_dim)
        {
            E::as_bf16(kv.k).zip(E::as_bf16(kv.v))
        } else {
            None
        },
        g,
        kv,
    };
    let group_len = g.group * g.head_dim;
    let groups_per_query = g.n_heads / g.group;
    let pairs = queries.len() * groups_per_query;
    let pair =
        |p: usize| (&queries[p / groups_per_query], p % groups_per_query, &q[p * group_len..(p + 1) * group_len]);
    let part_len = chunks::partial_len(g.group, g.head_dim);
    // Chunk `c` of pair `p` into `part`. Both ways of cutting the work run the chunks in the same
    // order, pair after pair, and a thread runs its share of them in that order, so the chunk
    // after this one — whose K rows it prefetches — is most often this thread's next.
    let run_chunk = |p: usize, c: usize, part: &mut [f32], scratch: &mut ChunkScratch| {
        let (query, kv_head, qg) = pair(p);
        let next = if c + 1 < chunks::count(query) {
            Some((chunks::query(query, c + 1), kv_head))
        } else {
            (p + 1 < pairs).then(|| (chunks::query(pair(p + 1).0, 0), pair(p + 1).1))
        };
        ctx.chunk(&GroupJob { query: &chunks::query(query, c), kv_head, q: qg }, next, part, scratch);
    };
    if pairs >= 2 * pool.threads() || queries.iter().all(|qr| chunks::count(qr) == 1) {
        pool.chunks_mut(out, group_len, |p, og| {
            SCRATCH.with_borrow_mut(|Scratch { chunk, part, acc }| {
                part.resize(part_len, 0.0);
                for c in 0..chunks::count(pair(p).0) {
                    run_chunk(p, c, part, chunk);
                    chunks::fold(acc, part, c, g.group, g.head_dim);
                }
                chunks::finish(acc, g.group, g.head_dim, og);
            });
        });
        return Ok(());
    }
    // Task `t` is chunk `t - first[p]` of pair `p`.
    let mut first = Vec::with_capacity(pairs + 1);
    first.push(0);
    for p in 0..pairs {
        first.push(first[p] + chunks::count(pair(p).0));
    }
    PARTIALS.with_borrow_mut(|partials| {
        partials.clear();
        partials.resize(first[pairs] * part_len, 0.0);
        pool.chunks_mut(partials, part_len, |t, part| {
            let p = first.partition_point(|&f| f <= t) - 1;
            SCRATCH.with_borrow_mut(|scratch| run_chunk(p, t - first[p], part, &mut scratch.chunk));
        });
        let mut acc = Vec::with_capacity(part_len);
        for (p, og) in out.chunks_exact_mut(group_len).enumerate() {
            let parts = &partials[first[p] * part_len..first[p + 1] * part_len];
            for (c, part) in parts.chunks_exact(part_len).enumerate() {
                chunks::fold(&mut acc, part, c, g.group, g.head_dim);
            }
            chunks::finish(&acc, g.group, g.head_dim, og);
        }
    });
    Ok(())
}

/// How far ahead (in blocks of 8 positions) the first head of a group prefetches K rows: the
/// rows of a paged cache come in runs of one block's slots, too short for the hardware
/// prefetcher to get ahead of the loads.
///
/// The task's other reads are prefetched one pass early, so that memory works while the
/// arithmetic runs: the scores pass brings in each position's V row as it reads its K row, and
/// the values pass brings in the K rows of the next task. On the test host (SmolLM2's cache:
/// bf16, context 160, read cold), a layer took about 68 µs at batch 8 and 12.6 µs at batch 1
/// with only the K look-ahead into L1, and 13–26% less this way into L2 (in-process A/B runs;
/// the host drifts too much between processes for absolute figures).
const PREFETCH_BLOCKS: usize = 2;

/// Prefetches into L2 the `count` rows of `head_dim` entries at `offsets[from..]` of `cache`;
/// positions past the end are skipped. L2 rather than L1: on the test host's AMD cores the same
/// prefetches into L1 gained nothing over the K look-ahead alone.
#[cfg(target_arch = "x86_64")]
#[inline]
fn prefetch_rows<E>(cache: &[E], offsets: &[usize], from: usize, count: usize, head_dim: usize) {
    use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
    let per_line = (64 / std::mem::size_of::<E>()).max(1);
    for &off in offsets.iter().skip(from).take(count) {
        for line in (0..head_dim).step_by(per_line) {
            // SAFETY: a prefetch is a hint; the address is inside `cache` (a validated row).
            unsafe { _mm_prefetch::<_MM_HINT_T1>(cache.as_ptr().add(off + line).cast()) };
        }
    }
}

thread_local! {
    /// This thread's buffers, reused across tasks and calls.
    static SCRATCH: RefCell<Scratch> = RefCell::default();
    /// The calling thread's chunk results when a call cuts its pairs into chunk tasks.
    static PARTIALS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Per-thread buffers reused across tasks.
#[derive(Default)]
struct Scratch {
    chunk: ChunkScratch,
    /// One chunk's result (see `chunks`).
    part: Vec<f32>,
    /// The running merge of a pair's chunk results.
    acc: Vec<f32>,
}

/// What one chunk's kernels need besides its result.
#[derive(Default)]
struct ChunkScratch {
    /// `scores[h * n + i]`: head `h` of the group at the `i`-th visible position.
    scores: Vec<f32>,
    /// Offset of each visible position's K/V row for the task's KV head.
    offsets: Vec<usize>,
    /// The same for the task after this one (empty for the last), to prefetch its K rows.
    next_offsets: Vec<usize>,
    /// One K or V row widened to f32 (portable path, non-f32 caches).
    row: Vec<f32>,
    /// The bf16 dot products' buffers.
    #[cfg(target_arch = "x86_64")]
    bf16: bf16_dot::Scratch,
}

/// What every task of one fast call shares.
struct Ctx<'c, 'a, E> {
    isa: Isa,
    /// The cache's K and V, where the tasks take the bf16 dot products (`bf16_dot`): on the
    /// AVX-512 BF16 ISA, for a bf16 cache of head sizes it takes, when the pool lets the query
    /// and the softmax weights be rounded to bf16.
    #[cfg(target_arch = "x86_64")]
    bf16_cache: Option<(&'c [half::bf16], &'c [half::bf16])>,
    g: Geometry,
    kv: &'c PagedKvLayer<'a, E>,
}

/// One (query token, KV head) of a fast call — or one chunk of its positions: the `group` query
/// heads reading that KV head.
struct GroupJob<'j> {
    query: &'j AttentionQuery<'j>,
    kv_head: usize,
    /// The group's query vectors, `group * head_dim` long.
    q: &'j [f32],
}

impl<E: Elem> Ctx<'_, '_, E> {
    /// One (query, KV head group) over the job's positions, on the pool's ISA: scores, their
    /// exponentials shifted by each head's maximum, and the weighted sum of values, written to
    /// `part` as a chunk result (see `chunks`). `next` is the (query, KV head) of the following
    /// task, whose K rows the SIMD path prefetches.
    fn chunk(
        &self,
        job: &GroupJob,
        next: Option<(AttentionQuery, usize)>,
        part: &mut [f32],
        scratch: &mut ChunkScratch,
    ) {
        let (g, qr) = (&self.g, job.query);
        scratch.offsets.clear();
        g.offsets_into(qr, job.kv_head, &mut scratch.offsets);
        scratch.next_offsets.clear();
        if let Some((next_query, next_head)) = next {
            g.offsets_into(&next_query, next_head, &mut scratch.next_offsets);
        }
        scratch.scores.clear();
        scratch.scores.resize(g.group * scratch.offsets.len(), 0.0);
        let (out, stats) = part.split_at_mut(g.group * g.head_dim);
        #[cfg(target_arch = "x86_64")]
        if self.isa.has_avx2() && g.head_dim.is_multiple_of(8) {
            let rows = x86::Rows {
                k: self.kv.k,
                v: self.kv.v,
                offsets: &scratch.offsets,
                next_offsets: &scratch.next_offsets,
                head_dim: g.head_dim,
                scale: g.scale,
            };
            if let Some((k, v)) = self.bf16_cache {
                let rows = x86::Rows {
                    k,
                    v,
                    offsets: rows.offsets,
                    next_offsets: rows.next_offsets,
                    head_dim: rows.head_dim,
                    scale: rows.scale,
                };
                // SAFETY: as below; the ISA has AVX-512 BF16, and `takes` holds.
                unsafe { bf16_dot::group(self.isa, &rows, job.q, &mut scratch.scores, out, stats, &mut scratch.bf16) };
                return;
            }
            // SAFETY: pools hold only supported ISAs (every x86 SIMD ISA includes AVX2 and FMA,
            // the AVX-512 ones also F and VL); the offsets were validated to start whole rows;
            // `q`, `out`, `scores` and `stats` are sized for the group's heads.
            unsafe {
                match self.isa {
                    Isa::Avx512 | Isa::Avx512Vnni | Isa::Avx512Bf16 => {
                        x86::group_avx512(self.isa, &rows, job.q, &mut scratch.scores, out, stats)
                    }
                    _ => x86::group_avx2(self.isa, &rows, job.q, &mut scratch.scores, out, stats),
                }
            }
            return;
        }
        self.chunk_portable(job, out, stats, scratch);
    }

    /// Portable [`Ctx::chunk`]: each position's K row widened once, one dot product per head;
    /// then its V row widened once, one `axpy` per head into the output.
    fn chunk_portable(&self, job: &GroupJob, out: &mut [f32], stats: &mut [f32], scratch: &mut ChunkScratch) {
        let (kv, hd, group) = (self.kv, self.g.head_dim, self.g.group);
        let ChunkScratch { scores, offsets, row, .. } = scratch;
        let n = offsets.len();
        for (i, &off) in offsets.iter().enumerate() {
            let k = E::widen(&kv.k[off..off + hd], row);
            for (h, qh) in job.q.chunks_exact(hd).enumerate() {
                scores[h * n + i] = crate::simd::dot(qh, k) * self.g.scale;
            }
        }
        for (h, head_scores) in scores.chunks_exact_mut(n).enumerate() {
            (stats[h], stats[group + h]) = exp_shifted_isa(self.isa, head_scores);
        }
        out.fill(0.0);
        for (i, &off) in offsets.iter().enumerate() {
            let v = E::widen(&kv.v[off..off + hd], row);
            for (h, oh) in out.chunks_exact_mut(hd).enumerate() {
                let w = scores[h * n + i];
                for (o, v) in oh.iter_mut().zip(v) {
                    *o += w * v;
                }
            }
        }
    }
}
