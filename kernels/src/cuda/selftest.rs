//! Every CUDA kernel against this crate's CPU reference, on random data, on the real device.
//!
//! Run by `tessera check kernels --device cuda` (and so by `kernels/gpu/check.sh`). Inputs are
//! rounded to bf16 before the CPU reference sees them, so the comparison measures the kernel's
//! arithmetic and its bf16 output rounding only. Pass: relative error ≤ 1e-2, exact for
//! integer results, and no NaN.

use half::bf16;

use super::device::GpuDevice;
use super::gemm::Gemm;
use super::ops::{AttentionArgs, AttentionScratch, RopeKvArgs, SampleRow, ShortRows};
use super::plan::{attention_split, plan_attention};
use super::{CudaError, guard};
use crate::attention::{AttentionQuery, PagedKvLayer, paged_attention_ref};
use crate::rope::{RopeConfig, RopeTable, apply_rope_ref};
use crate::{WeightData, WeightMatrix, activation, matmul, norm};

/// The outcome of one kernel's check.
#[derive(Debug, Clone)]
pub struct SelfTestResult {
    /// Kernel and case.
    pub kernel: String,
    /// ‖gpu − cpu‖ / ‖cpu‖ (0 for exact comparisons that match).
    pub rel_err: f64,
    /// Whether it passed.
    pub ok: bool,
}

/// Relative-error bound for bf16 outputs.
pub const TOLERANCE: f64 = 1e-2;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        // xorshift64*: deterministic, dependency-free.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }

    fn bf16_vec(&mut self, n: usize, scale: f32) -> Vec<bf16> {
        (0..n).map(|_| bf16::from_f32(self.next() * scale)).collect()
    }
}

fn f32s(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    for (g, w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f64::INFINITY;
        }
        num += f64::from(g - w).powi(2);
        den += f64::from(*w).powi(2);
    }
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    (num / den.max(1e-30)).sqrt()
}

fn result(kernel: impl Into<String>, rel_err: f64) -> SelfTestResult {
    SelfTestResult { kernel: kernel.into(), rel_err, ok: rel_err <= TOLERANCE }
}

fn shape_err(e: crate::KernelError) -> CudaError {
    CudaError::Shape { kernel: "selftest", detail: e.to_string() }
}

/// Runs every check; an `Err` means the device itself failed (not a mismatch).
pub fn run(dev: &GpuDevice) -> Result<Vec<SelfTestResult>, CudaError> {
    guard(|| {
        let mut out = Vec::new();
        let s = dev.stream().clone();
        let mut rng = Rng(0x5EED_1234_ABCD_0001);
        let gemm = Gemm::new(s.clone())?;

        // GEMM (cuBLASLt) at decode and prefill shapes, including sizes that are not multiples
        // of 8, then the GEMV kernel (small batches), both against the same reference.
        let products = [
            ("gemm", 1, 1000, 576),
            ("gemm", 7, 1536, 576),
            ("gemm", 130, 577, 333),
            ("gemv", 1, 1000, 576),
            ("gemv", 4, 37, 1032),
            ("gemv", 3, 5, 14336),
        ];
        for (kind, tokens, rows, cols) in products {
            let x = rng.bf16_vec(tokens * cols, 1.0);
            let w = rng.bf16_vec(rows * cols, 0.1);
            let (dx, dw) = (s.clone_htod(&x)?, s.clone_htod(&w)?);
            let mut dy = s.alloc_zeros::<bf16>(tokens * rows)?;
            if kind == "gemv" {
                dev.gemv(&dx, &dw, &mut dy, tokens, rows, cols)?;
            } else {
                gemm.matmul(&dx, &dw, &mut dy, tokens, rows, cols)?;
            }
            let got = f32s(&s.clone_dtoh(&dy)?);
            let wm = WeightMatrix::new(WeightData::Bf16(&w), rows, cols).map_err(shape_err)?;
            let mut want = vec![0.0; tokens * rows];
            matmul::matmul_ref(&f32s(&x), tokens, &wm, &mut want).map_err(shape_err)?;
            out.push(result(format!("{kind} {tokens}x{rows}x{cols}"), rel_err(&got, &want)));
        }

        // Embedding gather.
        let (vocab, hidden, n) = (300, 100, 9);
        let table = rng.bf16_vec(vocab * hidden, 1.0);
        let ids: Vec<i32> = (0..n).map(|i| (i * 37 % vocab) as i32).collect();
        let dtable = s.clone_htod(&table)?;
        let dids = s.clone_htod(&ids)?;
        let mut dx = s.alloc_zeros::<f32>(n * hidden)?;
        dev.embedding(&dtable, &dids.slice(..), &mut dx, n, hidden)?;
        let got = s.clone_dtoh(&dx)?;
        let want: Vec<f32> =
            ids.iter().flat_map(|&i| f32s(&table[i as usize * hidden..(i as usize + 1) * hidden])).collect();
        out.push(result("embedding_gather", rel_err(&got, &want)));

        // Residual add + RMSNorm, for a vectorised and an odd width.
        for (n, hidden) in [(5, 576), (3, 100)] {
            let x: Vec<f32> = (0..n * hidden).map(|_| rng.next()).collect();
            let delta = rng.bf16_vec(n * hidden, 0.5);
            let weight = rng.bf16_vec(hidden, 1.0);
            let mut dx = s.clone_htod(&x)?;
            let ddelta = s.clone_htod(&delta)?;
            let dweight = s.clone_htod(&weight)?;
            let mut dout = s.alloc_zeros::<bf16>(n * hidden)?;
            dev.add_rmsnorm(&mut dx, Some(&ddelta), &dweight, &mut dout, n, hidden, 1e-5)?;
            let sum: Vec<f32> = x.iter().zip(f32s(&delta)).map(|(a, b)| a + b).collect();
            let mut want = vec![0.0; n * hidden];
            norm::rms_norm_ref(&sum, &f32s(&weight), 1e-5, &mut want).map_err(shape_err)?;
            out.push(result(format!("add_rmsnorm {n}x{hidden}"), rel_err(&f32s(&s.clone_dtoh(&dout)?), &want)));
            out.push(result(format!("add_rmsnorm residual {n}x{hidden}"), rel_err(&s.clone_dtoh(&dx)?, &sum)));
        }

        out.push(rope_kv_write_case(dev, &mut rng)?);

        // SiLU·mul on [gate | up] rows.
        let (n, ffn) = (5, 1536 + 3);
        let gu = rng.bf16_vec(n * 2 * ffn, 3.0);
        let dgu = s.clone_htod(&gu)?;
        let mut dact = s.alloc_zeros::<bf16>(n * ffn)?;
        dev.silu_mul(&dgu, &mut dact, n, ffn)?;
        let guf = f32s(&gu);
        let (gate, up): (Vec<f32>, Vec<f32>) = (0..n)
            .flat_map(|r| (0..ffn).map(move |j| (r, j)))
            .map(|(r, j)| (guf[r * 2 * ffn + j], guf[r * 2 * ffn + ffn + j]))
            .unzip();
        let mut want = vec![0.0; n * ffn];
        activation::silu_mul_ref(&gate, &up, &mut want).map_err(shape_err)?;
        out.push(result("silu_mul", rel_err(&f32s(&s.clone_dtoh(&dact)?), &want)));

        // Token picks: arg-max rows (distinct values, so no near-ties), a top-1 draw (the
        // arg-max whatever the number), and draws between two equal peaks that hold all the
        // mass (the number picks the lower id below 0.5, the higher one above).
        let (rows, vocab) = (6, 32768 + 5);
        let mut logits = rng.bf16_vec(rows * vocab, 4.0);
        let peaks = [0usize, 12_345, vocab - 1, 77, 500, 500];
        for (r, &p) in peaks.iter().enumerate() {
            logits[r * vocab + p] = bf16::from_f32(50.0);
        }
        for r in [4, 5] {
            logits[r * vocab + 9_000] = bf16::from_f32(50.0);
        }
        let draw = |top_k, uniform| SampleRow { inv_temperature: 1.0, top_k, uniform, ..SampleRow::GREEDY };
        let params: Vec<i32> =
            [SampleRow::GREEDY, SampleRow::GREEDY, SampleRow::GREEDY, draw(1, 0.99), draw(2, 0.25), draw(0, 0.75)]
                .iter()
                .flat_map(SampleRow::words)
                .collect();
        let want = [0u32, 12_345, vocab as u32 - 1, 77, 500, 9_000];
        let (dl, dparams) = (s.clone_htod(&logits)?, s.clone_htod(&params)?);
        let mut dpicked = s.alloc_zeros::<u32>(rows)?;
        dev.sample(&dl, &dparams.slice(..), rows, vocab, &mut dpicked)?;
        let exact = s.clone_dtoh(&dpicked)? == want;
        out.push(SelfTestResult { kernel: "sample_rows".into(), rel_err: if exact { 0.0 } else { 1.0 }, ok: exact });

        for case in [
            AttnCase::decode_long(),
            AttnCase::decode_batch(),
            AttnCase::prefill(),
            AttnCase::decode_stale_split(),
            AttnCase::mixed(),
        ] {
            out.push(attention_case(dev, &mut rng, &case)?);
        }
        Ok(out)
    })
}

struct AttnCase {
    name: &'static str,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    /// Per sequence: (context length, number of query rows at its end).
    seqs: Vec<(usize, usize)>,
    window: Option<usize>,
    /// A split sized for a shorter context than the real one (as a captured decode graph
    /// replays): the last partition must stretch to each query's end.
    stale_split_for: Option<usize>,
}

impl AttnCase {
    fn decode_long() -> Self {
        // One sequence, long context: exercises the split over the KV length.
        AttnCase {
            name: "attention decode 1x2500 (split-KV)",
            n_heads: 8,
            n_kv_heads: 2,
            head_dim: 128,
            block_size: 16,
            seqs: vec![(2500, 1)],
            window: None,
            stale_split_for: None,
        }
    }
    fn decode_stale_split() -> Self {
        AttnCase {
            name: "attention decode 2 seqs, split sized for 256 at context 700",
            n_heads: 8,
            n_kv_heads: 2,
            head_dim: 128,
            block_size: 16,
            seqs: vec![(700, 1), (300, 1)],
            window: None,
            stale_split_for: Some(256),
        }
    }
    fn decode_batch() -> Self {
        AttnCase {
            name: "attention decode 5 seqs GQA 9/3",
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            block_size: 16,
            seqs: vec![(1, 1), (17, 1), (300, 1), (33, 1), (64, 1)],
            window: None,
            stale_split_for: None,
        }
    }
    fn mixed() -> Self {
        // A 150-row chunk after a 70-token prefix (tensor-core tiles), a decode row and a
        // 5-row chunk (CUDA-core kernel, listed rows) in one step.
        AttnCase {
            name: "attention mixed: 150-row chunk (flash), decode row, 5-row chunk",
            n_heads: 8,
            n_kv_heads: 2,
            head_dim: 128,
            block_size: 16,
            seqs: vec![(220, 150), (90, 1), (33, 5)],
            window: None,
            stale_split_for: None,
        }
    }
    fn prefill() -> Self {
        // 40 new rows after a 25-token cached prefix, with a sliding window.
        AttnCase {
            name: "attention prefill 40 rows, prefix 25, window 32",
            n_heads: 4,
            n_kv_heads: 4,
            head_dim: 64,
            block_size: 16,
            seqs: vec![(65, 40)],
            window: Some(32),
            stale_split_for: None,
        }
    }
}

fn attention_case(dev: &GpuDevice, rng: &mut Rng, c: &AttnCase) -> Result<SelfTestResult, CudaError> {
    let s = dev.stream().clone();
    let kv_dim = c.n_kv_heads * c.head_dim;
    let q_dim = c.n_heads * c.head_dim;
    let max_blocks = c.seqs.iter().map(|&(ctx, _)| ctx.div_ceil(c.block_size)).max().unwrap_or(1);
    let num_blocks = max_blocks * c.seqs.len() + 3;
    // Shuffled block ids: block tables are not contiguous.
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    for i in (1..ids.len()).rev() {
        let j = ((rng.next() + 1.0) * 0.5 * i as f32) as usize % (i + 1);
        ids.swap(i, j);
    }
    let tables: Vec<Vec<u32>> =
        (0..c.seqs.len()).map(|sq| ids[sq * max_blocks..(sq + 1) * max_blocks].to_vec()).collect();
    let k_cache = rng.bf16_vec(num_blocks * c.block_size * kv_dim, 1.0);
    let v_cache = rng.bf16_vec(num_blocks * c.block_size * kv_dim, 1.0);
    let mut q_rows = Vec::new();
    let (mut query_seq, mut ctx_lens, mut windows) = (Vec::new(), Vec::new(), Vec::new());
    for (sq, &(ctx, rows)) in c.seqs.iter().enumerate() {
        for r in 0..rows {
            let end = ctx - rows + r + 1;
            query_seq.push(sq as i32);
            ctx_lens.push(end as i32);
            windows.push(c.window.map_or(0, |w| end.saturating_sub(w)) as i32);
            q_rows.extend(rng.bf16_vec(q_dim, 1.0));
        }
    }
    let nq = query_seq.len();
    let flat_tables: Vec<i32> = tables.iter().flatten().map(|&b| b as i32).collect();
    let (dk, dv, dq) = (s.clone_htod(&k_cache)?, s.clone_htod(&v_cache)?, s.clone_htod(&q_rows)?);
    let (dt, dseq, dctx, dwin) =
        (s.clone_htod(&flat_tables)?, s.clone_htod(&query_seq)?, s.clone_htod(&ctx_lens)?, s.clone_htod(&windows)?);
    let mut dout = s.alloc_zeros::<bf16>(nq * q_dim)?;
    let (tv, sv, cv, wv) = (dt.slice(..), dseq.slice(..), dctx.slice(..), dwin.slice(..));
    let chunk_lens: Vec<usize> = c.seqs.iter().map(|&(_, rows)| rows).collect();
    let (short, tiles) = plan_attention(&chunk_lens, c.head_dim);
    // Device copies need at least one element; unused ones are never read.
    let (d_short, d_tiles) =
        (s.clone_htod(&[short.as_slice(), &[0]].concat())?, s.clone_htod(&[tiles.as_slice(), &[0]].concat())?);
    let (short_v, tiles_v) = (d_short.slice(..), d_tiles.slice(..));
    let split = attention_split(
        short.len() * c.n_heads,
        c.stale_split_for.unwrap_or_else(|| c.seqs.iter().map(|&(ctx, _)| ctx).max().unwrap_or(1)),
        dev.sm_count(),
    );
    let args = AttentionArgs {
        q_stride: q_dim,
        block_tables: &tv,
        max_blocks_per_seq: max_blocks,
        query_seq: &sv,
        context_lens: &cv,
        window_starts: &wv,
        n_queries: nq,
        n_heads: c.n_heads,
        n_kv_heads: c.n_kv_heads,
        head_dim: c.head_dim,
        block_size: c.block_size,
        short_rows: ShortRows::of(short.len(), nq, &short_v, split),
        flash_tiles: (&tiles_v, tiles.len() / 2),
    };
    dev.attention(&dq, &dk, &dv, &mut dout, &mut AttentionScratch::default(), &args)?;
    let got = f32s(&s.clone_dtoh(&dout)?);
    let layout =
        PagedKvLayer { k: &[], v: &[], block_size: c.block_size, n_kv_heads: c.n_kv_heads, head_dim: c.head_dim };
    // The device cache is `(blocks, block_size, n_kv_heads, head_dim)`; the CPU reference reads
    // `(blocks, n_kv_heads, block_size, head_dim)`.
    let host_layout = |cache: &[bf16]| {
        let mut out = vec![0.0f32; cache.len()];
        for (row, values) in cache.chunks_exact(c.head_dim).enumerate() {
            let (slot, h) = (row / c.n_kv_heads, row % c.n_kv_heads);
            let dst = layout.offset(slot / c.block_size, slot % c.block_size, h);
            for (o, v) in out[dst..dst + c.head_dim].iter_mut().zip(values) {
                *o = v.to_f32();
            }
        }
        out
    };
    let (kf, vf) = (host_layout(&k_cache), host_layout(&v_cache));
    let layer = PagedKvLayer { k: &kf, v: &vf, ..layout };
    let queries: Vec<AttentionQuery<'_>> = (0..nq)
        .map(|i| AttentionQuery {
            block_table: &tables[query_seq[i] as usize],
            context_len: ctx_lens[i] as usize,
            window_start: windows[i] as usize,
        })
        .collect();
    let mut want = vec![0.0; nq * q_dim];
    paged_attention_ref(&f32s(&q_rows), &queries, &layer, c.n_heads, &mut want).map_err(shape_err)?;
    Ok(result(c.name, rel_err(&got, &want)))
}

/// RoPE fused with the KV-cache write: queries rotated in place, keys rotated into the cache,
/// values copied, at each token's slot; a token with slot -1 writes nothing to the cache.
fn rope_kv_write_case(dev: &GpuDevice, rng: &mut Rng) -> Result<SelfTestResult, CudaError> {
    let s = dev.stream().clone();
    let (n, nh, nkv, hd, max_pos, n_slots) = (6, 4, 2, 64, 4096, 64);
    let (q_dim, kv_dim) = (nh * hd, nkv * hd);
    let row = q_dim + 2 * kv_dim;
    let table = RopeTable::new(&RopeConfig { head_dim: hd, theta: 1e6, max_positions: max_pos, scaling: None })
        .map_err(shape_err)?;
    let (mut cos, mut sin) = (Vec::with_capacity(max_pos * hd / 2), Vec::with_capacity(max_pos * hd / 2));
    for p in 0..max_pos {
        let (c, sn) = table.cos_sin(p).ok_or_else(|| shape_err(crate::KernelError::Pool("rope table".into())))?;
        cos.extend_from_slice(c);
        sin.extend_from_slice(sn);
    }
    let qkv = rng.bf16_vec(n * row, 1.0);
    let positions: Vec<i32> = vec![0, 1, 17, 300, 2047, 4095];
    let slots: Vec<i32> = vec![3, 40, -1, 63, 0, 9];
    let mut dqkv = s.clone_htod(&qkv)?;
    let (dpos, dslots) = (s.clone_htod(&positions)?, s.clone_htod(&slots)?);
    let (dcos, dsin) = (s.clone_htod(&cos)?, s.clone_htod(&sin)?);
    // The caches start as NaN, so a slot written by mistake or left unwritten shows.
    let nan = vec![bf16::NAN; n_slots * kv_dim];
    let (mut dk, mut dv) = (s.clone_htod(&nan)?, s.clone_htod(&nan)?);
    let (pos_view, slot_view) = (dpos.slice(..), dslots.slice(..));
    let args = RopeKvArgs {
        positions: &pos_view,
        cos: &dcos,
        sin: &dsin,
        slots: &slot_view,
        n,
        n_heads: nh,
        n_kv_heads: nkv,
        row_stride: row,
        head_dim: hd,
    };
    dev.rope_kv_write(&mut dqkv, &mut dk, &mut dv, &args)?;
    // Reference: rotate the query and key heads of each row, then scatter keys and values.
    let mut rotated = f32s(&qkv);
    for (r, &p) in positions.iter().enumerate() {
        let heads = &mut rotated[r * row..r * row + q_dim + kv_dim];
        apply_rope_ref(&table, heads, &[p as u32], nh + nkv).map_err(shape_err)?;
    }
    let (mut want_q, mut want_k, mut want_v) =
        (Vec::new(), vec![f32::NAN; n_slots * kv_dim], vec![f32::NAN; n_slots * kv_dim]);
    for (r, &slot) in slots.iter().enumerate() {
        let rr = &rotated[r * row..(r + 1) * row];
        want_q.extend_from_slice(&rr[..q_dim]);
        if let Ok(sl) = usize::try_from(slot) {
            want_k[sl * kv_dim..(sl + 1) * kv_dim].copy_from_slice(&rr[q_dim..q_dim + kv_dim]);
            want_v[sl * kv_dim..(sl + 1) * kv_dim]
                .copy_from_slice(&f32s(&qkv[r * row + q_dim + kv_dim..(r + 1) * row]));
        }
    }
    let got_qkv = f32s(&s.clone_dtoh(&dqkv)?);
    let got_q: Vec<f32> = got_qkv.chunks(row).flat_map(|r| r[..q_dim].iter().copied()).collect();
    // Keys and values are compared on the written slots; every other slot must still be NaN.
    let (got_k, got_v) = (f32s(&s.clone_dtoh(&dk)?), f32s(&s.clone_dtoh(&dv)?));
    let untouched = |got: &[f32], want: &[f32]| got.iter().zip(want).all(|(g, w)| g.is_nan() == w.is_nan());
    let written = |v: &[f32]| v.iter().copied().filter(|x| !x.is_nan()).collect::<Vec<f32>>();
    let v_exact = written(&got_v) == written(&want_v);
    let err = rel_err(&got_q, &want_q).max(rel_err(&written(&got_k), &written(&want_k)));
    let ok = untouched(&got_k, &want_k) && untouched(&got_v, &want_v) && v_exact && err <= 1e-2;
    Ok(SelfTestResult { kernel: "rope_kv_write".into(), rel_err: err, ok })
}
