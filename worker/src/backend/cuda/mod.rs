//! The CUDA backend: bf16 weights and activations, f32 residual stream and accumulation.
//!
//! Weights are uploaded once with the projections fused (`q|k|v` rows in one matrix,
//! `gate|up` in another) so a layer runs four GEMMs. KV storage per layer is
//! `(num_blocks, block_size, n_kv_heads, head_dim)` bf16, the layout the paged-attention kernel
//! reads. Each step uploads one packed metadata buffer (ids, positions, slots, block tables),
//! runs every layer on the device's stream, and copies back only the logits or, when no row
//! needs its logits on the host, one token id per sequence, picked on the device. Invariant:
//! activations live in a workspace that only grows, so steady-state decoding allocates nothing.

use std::path::PathBuf;
use std::sync::Arc;

use half::bf16;
use tessera_kernels::cuda::gemm::Gemm;
use tessera_kernels::cuda::ops::{AttentionArgs, AttentionScratch, RopeKvArgs, SAMPLE_ROW_WORDS, SampleRow, ShortRows};
use tessera_kernels::cuda::plan::{GemvShapes, ProductTiming, attention_split, plan_attention};
use tessera_kernels::cuda::{CudaError, GpuDevice, GpuOptions};
use tessera_kernels::rope::RopeTable;

use super::{BackendInfo, ModelBackend};
use crate::config::ModelConfig;
use crate::error::{EngineError, LoadError};
use crate::kv_cache::KvCacheConfig;
use crate::loader::ResolvedModel;
use crate::model::SeqChunk;
use crate::sampler::DevicePick;
use crate::tensor::WeightsDtype;

use std::collections::HashMap;

use cudarc::driver::{CudaSlice, CudaStream};
use tessera_kernels::cuda::device::Graph;

mod tuning;

/// How to open the GPU.
#[derive(Debug, Clone)]
pub struct CudaOptions {
    /// Device ordinal.
    pub device: usize,
    /// Extra library folders.
    pub lib_dirs: Vec<PathBuf>,
    /// Cache root (compiled kernels go under it).
    pub cache_dir: PathBuf,
}

struct Layer {
    input_layernorm: CudaSlice<bf16>,          // (hidden)
    qkv_proj: CudaSlice<bf16>,                 // (q_dim + 2 * kv_dim, hidden)
    o_proj: CudaSlice<bf16>,                   // (hidden, q_dim)
    post_attention_layernorm: CudaSlice<bf16>, // (hidden)
    gate_up_proj: CudaSlice<bf16>,             // (2 * intermediate, hidden)
    down_proj: CudaSlice<bf16>,                // (hidden, intermediate)
}

/// Activations for up to `tokens` rows and `seqs` sequences.
struct Workspace {
    tokens: usize,
    seqs: usize,
    x: CudaSlice<f32>,            // (tokens, hidden) residual stream
    normed: CudaSlice<bf16>,      // (tokens, hidden)
    qkv: CudaSlice<bf16>,         // (tokens, q_dim + 2 * kv_dim)
    attn: CudaSlice<bf16>,        // (tokens, q_dim)
    proj: CudaSlice<bf16>,        // (tokens, hidden)
    gate_up: CudaSlice<bf16>,     // (tokens, 2 * intermediate)
    act: CudaSlice<bf16>,         // (tokens, intermediate)
    last_x: CudaSlice<f32>,       // (seqs, hidden)
    last_normed: CudaSlice<bf16>, // (seqs, hidden)
    logits: CudaSlice<bf16>,      // (seqs, vocab)
    logits_f32: CudaSlice<f32>,   // (seqs, vocab)
    next_tokens: CudaSlice<u32>,  // (seqs)
}

impl Workspace {
    fn new(stream: &Arc<CudaStream>, c: &ModelConfig, tokens: usize, seqs: usize) -> Result<Self, CudaError> {
        let qkv_dim = c.q_dim() + 2 * c.kv_dim();
        let h = c.hidden_size;
        Ok(Workspace {
            tokens,
            seqs,
            x: stream.alloc_zeros(tokens * h)?,
            normed: stream.alloc_zeros(tokens * h)?,
            qkv: stream.alloc_zeros(tokens * qkv_dim)?,
            attn: stream.alloc_zeros(tokens * c.q_dim())?,
            proj: stream.alloc_zeros(tokens * h)?,
            gate_up: stream.alloc_zeros(tokens * 2 * c.intermediate_size)?,
            act: stream.alloc_zeros(tokens * c.intermediate_size)?,
            last_x: stream.alloc_zeros(seqs * h)?,
            last_normed: stream.alloc_zeros(seqs * h)?,
            logits: stream.alloc_zeros(seqs * c.vocab_size)?,
            logits_f32: stream.alloc_zeros(seqs * c.vocab_size)?,
            next_tokens: stream.alloc_zeros(seqs)?,
        })
    }
}

/// A model on one NVIDIA GPU.
pub struct CudaBackend {
    dev: Arc<GpuDevice>,
    gemm: Gemm,
    config: ModelConfig,
    kv: KvCacheConfig,
    embed_tokens: CudaSlice<bf16>,    // (vocab, hidden)
    lm_head: Option<CudaSlice<bf16>>, // (vocab, hidden); None = tied
    norm: CudaSlice<bf16>,            // (hidden)
    layers: Vec<Layer>,
    k_cache: Vec<CudaSlice<bf16>>, // per layer (blocks, block_size, n_kv_heads, head_dim)
    v_cache: Vec<CudaSlice<bf16>>,
    rope_cos: CudaSlice<f32>, // (max_positions, head_dim / 2)
    rope_sin: CudaSlice<f32>,
    workspace: Option<Workspace>,
    /// Bumped whenever the workspace is reallocated.
    workspace_generation: u64,
    scratch: AttentionScratch,
    graphs: HashMap<StepShape, DecodeGraph>,
    weight_bytes_per_step: usize,
    /// Batch-1 products that run on the GEMV kernel, and the load-time timings that chose them.
    gemv_shapes: GemvShapes,
    product_timings: Vec<ProductTiming>,
    /// Where `product_timings` came from (measured now, or read from the tuning record).
    timings_source: String,
}

fn dev_err(e: CudaError) -> LoadError {
    LoadError::Device(e.to_string())
}

fn run_err(e: CudaError) -> EngineError {
    EngineError::Device(e.to_string())
}

impl CudaBackend {
    /// Opens the GPU, uploads the weights (bf16) and allocates KV storage for `kv`.
    pub fn new(
        model: &ResolvedModel,
        options: &CudaOptions,
        kv: KvCacheConfig,
        mut on_layer: impl FnMut(usize),
    ) -> Result<Self, LoadError> {
        kv.validate().map_err(|e| LoadError::InvalidConfig(e.to_string()))?;
        let c = model.config.clone();
        if !c.head_dim.is_multiple_of(32) || c.head_dim > 256 {
            return Err(LoadError::InvalidConfig(format!(
                "the CUDA attention kernel needs head_dim a multiple of 32 up to 256, this model has {}",
                c.head_dim
            )));
        }
        let dev = GpuDevice::open(&GpuOptions {
            device: options.device,
            lib_dirs: options.lib_dirs.clone(),
            cache_dir: options.cache_dir.clone(),
        })
        .map_err(dev_err)?;
        let stream = dev.stream().clone();
        let gemm = Gemm::new(stream.clone()).map_err(dev_err)?;
        let w = model.weights.as_ref();
        let (h, q, kvd, ffn) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let upload = |v: &[bf16]| stream.clone_htod(v).map_err(|e| dev_err(e.into()));
        let load = |name: &str, shape: &[usize]| w.load(name, shape, WeightsDtype::Bf16).map(|t| t.into_bf16());
        let mut weight_bytes = 0usize;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let mut qkv = load(&format!("{p}.self_attn.q_proj.weight"), &[q, h])?;
            qkv.extend(load(&format!("{p}.self_attn.k_proj.weight"), &[kvd, h])?);
            qkv.extend(load(&format!("{p}.self_attn.v_proj.weight"), &[kvd, h])?);
            let o = load(&format!("{p}.self_attn.o_proj.weight"), &[h, q])?;
            let mut gate_up = load(&format!("{p}.mlp.gate_proj.weight"), &[ffn, h])?;
            gate_up.extend(load(&format!("{p}.mlp.up_proj.weight"), &[ffn, h])?);
            let down = load(&format!("{p}.mlp.down_proj.weight"), &[h, ffn])?;
            weight_bytes += 2 * (qkv.len() + o.len() + gate_up.len() + down.len());
            layers.push(Layer {
                input_layernorm: upload(&load(&format!("{p}.input_layernorm.weight"), &[h])?)?,
                qkv_proj: upload(&qkv)?,
                o_proj: upload(&o)?,
                post_attention_layernorm: upload(&load(&format!("{p}.post_attention_layernorm.weight"), &[h])?)?,
                gate_up_proj: upload(&gate_up)?,
                down_proj: upload(&down)?,
            });
            on_layer(i);
        }
        let embed_tokens = upload(&load("model.embed_tokens.weight", &[c.vocab_size, h])?)?;
        let lm_head = if crate::loader::weights::lm_head_is_tied(&c, w) {
            None
        } else {
            Some(upload(&load("lm_head.weight", &[c.vocab_size, h])?)?)
        };
        // One embedding row plus the whole LM head per step.
        weight_bytes += 2 * (h + c.vocab_size * h);
        let norm = upload(&load("model.norm.weight", &[h])?)?;

        let rope = RopeTable::new(&c.rope_config()).map_err(|e| LoadError::InvalidConfig(e.to_string()))?;
        let half = c.head_dim / 2;
        let (mut cos, mut sin) = (Vec::with_capacity(c.max_position_embeddings * half), Vec::new());
        sin.reserve(c.max_position_embeddings * half);
        for p in 0..c.max_position_embeddings {
            let (cs, sn) =
                rope.cos_sin(p).ok_or_else(|| LoadError::InvalidConfig(format!("RoPE table lacks position {p}")))?;
            cos.extend_from_slice(cs);
            sin.extend_from_slice(sn);
        }
        let rope_cos = stream.clone_htod(&cos).map_err(|e| dev_err(e.into()))?;
        let rope_sin = stream.clone_htod(&sin).map_err(|e| dev_err(e.into()))?;

        let per_layer = kv.num_blocks * kv.block_size * kvd;
        let mut k_cache = Vec::with_capacity(c.num_layers);
        let mut v_cache = Vec::with_capacity(c.num_layers);
        for _ in 0..c.num_layers {
            k_cache.push(stream.alloc_zeros::<bf16>(per_layer).map_err(|e| dev_err(e.into()))?);
            v_cache.push(stream.alloc_zeros::<bf16>(per_layer).map_err(|e| dev_err(e.into()))?);
        }
        dev.synchronize().map_err(dev_err)?;
        let mut backend = CudaBackend {
            dev: Arc::new(dev),
            gemm,
            config: c,
            kv,
            embed_tokens,
            lm_head,
            norm,
            layers,
            k_cache,
            v_cache,
            rope_cos,
            rope_sin,
            workspace: None,
            workspace_generation: 0,
            scratch: AttentionScratch::default(),
            graphs: HashMap::new(),
            weight_bytes_per_step: weight_bytes,
            gemv_shapes: GemvShapes::default(),
            product_timings: Vec::new(),
            timings_source: String::new(),
        };
        (backend.product_timings, backend.timings_source) =
            backend.decode_product_timings(&options.cache_dir).map_err(dev_err)?;
        backend.gemv_shapes = GemvShapes::from_timings(&backend.product_timings);
        backend.apply_cublas_choices(&backend.product_timings).map_err(dev_err)?;
        Ok(backend)
    }

    /// The per-step metadata of `chunks`, packed as ids | positions | slots | query_seq |
    /// context_lens | window_starts | last_rows | block_tables (rows padded to `min_blocks`) |
    /// short rows (only when some chunk goes to flash) | flash tiles, with the step's shape and
    /// its longest context. A step that picks its tokens on the device appends its
    /// [`SampleRow`]s last (see [`push_sample_rows`]).
    fn build_meta(
        &self,
        chunks: &[SeqChunk<'_>],
        min_blocks: usize,
    ) -> Result<(Vec<i32>, StepShape, usize), EngineError> {
        let c = &self.config;
        let n: usize = chunks.iter().map(|ch| ch.tokens.len()).sum();
        let nseq = chunks.len();
        let max_blocks = chunks.iter().map(|ch| ch.block_table.len()).max().unwrap_or(1).max(min_blocks).max(1);
        let mut cols: [Vec<i32>; 6] = Default::default();
        let mut max_context = 0;
        for (si, ch) in chunks.iter().enumerate() {
            if ch.start_pos + ch.tokens.len() > c.max_position_embeddings {
                return Err(EngineError::ContextOverflow {
                    prompt: ch.start_pos + ch.tokens.len(),
                    max_new: 0,
                    context: c.max_position_embeddings,
                });
            }
            for (i, &tok) in ch.tokens.iter().enumerate() {
                if tok as usize >= c.vocab_size {
                    return Err(EngineError::TokenOutOfRange { id: tok, vocab: c.vocab_size });
                }
                let pos = ch.start_pos + i;
                let slot = self.kv.slot(ch.block_table, pos)?;
                if slot >= self.kv.num_blocks * self.kv.block_size {
                    return Err(EngineError::InvalidKvConfig("block table points past the cache".into()));
                }
                cols[0].push(tok as i32);
                cols[1].push(pos as i32);
                cols[2].push(slot as i32);
                cols[3].push(si as i32);
                cols[4].push(pos as i32 + 1);
                cols[5].push(c.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w)) as i32);
            }
            max_context = max_context.max(ch.start_pos + ch.tokens.len());
        }
        let mut meta: Vec<i32> = Vec::with_capacity(6 * n + nseq + nseq * max_blocks);
        for col in &cols {
            meta.extend_from_slice(col);
        }
        let mut end = 0;
        for ch in chunks {
            end += ch.tokens.len();
            meta.push(end as i32 - 1);
        }
        for ch in chunks {
            meta.extend(ch.block_table.iter().map(|&b| b as i32));
            meta.extend(std::iter::repeat_n(0, max_blocks - ch.block_table.len()));
        }
        let lens: Vec<usize> = chunks.iter().map(|ch| ch.tokens.len()).collect();
        let (short_rows, tiles) = plan_attention(&lens, c.head_dim);
        let split = attention_split(short_rows.len() * c.num_heads, max_context, self.dev.sm_count());
        let shape = StepShape { n, nseq, max_blocks, short_rows: short_rows.len(), tiles: tiles.len() / 2, split };
        if shape.listed() > 0 {
            meta.extend_from_slice(&short_rows);
        }
        meta.extend_from_slice(&tiles);
        Ok((meta, shape, max_context))
    }

    /// Grows the activation workspace to `n` tokens and `nseq` sequences (never shrinks).
    fn ensure_workspace(&mut self, n: usize, nseq: usize) -> Result<(), EngineError> {
        if self.workspace.as_ref().is_some_and(|ws| ws.tokens >= n && ws.seqs >= nseq) {
            return Ok(());
        }
        let (tokens, seqs) = self.workspace.as_ref().map_or((n, nseq), |ws| (ws.tokens.max(n), ws.seqs.max(nseq)));
        // Graphs point at the old buffers: invalidate them before freeing, even if the new
        // allocation then fails.
        self.workspace_generation += 1;
        self.workspace = None; // free before allocating the larger one
        let stream = self.dev.stream().clone();
        self.workspace = Some(Workspace::new(&stream, &self.config, tokens, seqs).map_err(run_err)?);
        Ok(())
    }

    /// Queues one step: every layer, the LM head (bf16 logits in the workspace) and, when
    /// `pick`, each sequence's token by the [`SampleRow`]s at the end of `meta`. Enqueues only
    /// (no allocation, no host sync), so it can be captured into a graph.
    fn enqueue(&mut self, meta: &CudaSlice<i32>, shape: StepShape, pick: bool) -> Result<(), EngineError> {
        let c = &self.config;
        let StepShape { n, nseq, max_blocks, tiles, .. } = shape;
        let (h, qd, kvd, ffn) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let qkv_dim = qd + 2 * kvd;
        let ws = self.workspace.as_mut().ok_or_else(|| EngineError::Internal("workspace missing".into()))?;
        let view = |k: usize, len: usize| meta.slice(k..k + len);
        let (ids, positions, slots) = (view(0, n), view(n, n), view(2 * n, n));
        let (query_seq, context_lens, window_starts) = (view(3 * n, n), view(4 * n, n), view(5 * n, n));
        let last_rows = view(6 * n, nseq);
        let block_tables = view(6 * n + nseq, nseq * max_blocks);
        let rows_at = 6 * n + nseq + nseq * max_blocks;
        let (row_list, tile_list) = (view(rows_at, shape.listed()), view(rows_at + shape.listed(), 2 * tiles));
        let pick_rows = view(rows_at + shape.listed() + 2 * tiles, if pick { nseq * SAMPLE_ROW_WORDS } else { 0 });
        let short_rows = ShortRows::of(shape.short_rows, n, &row_list, shape.split);

        let dev = &self.dev;
        let gemm = &self.gemm;
        let gemv = &self.gemv_shapes;
        dev.embedding(&self.embed_tokens, &ids, &mut ws.x, n, h).map_err(run_err)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let delta = if li == 0 { None } else { Some(&ws.proj) };
            dev.add_rmsnorm(&mut ws.x, delta, &layer.input_layernorm, &mut ws.normed, n, h, c.rms_norm_eps)
                .map_err(run_err)?;
            project(dev, gemm, gemv, &ws.normed, &layer.qkv_proj, &mut ws.qkv, n, qkv_dim, h).map_err(run_err)?;
            let rope = RopeKvArgs {
                positions: &positions,
                cos: &self.rope_cos,
                sin: &self.rope_sin,
                slots: &slots,
                n,
                n_heads: c.num_heads,
                n_kv_heads: c.num_kv_heads,
                row_stride: qkv_dim,
                head_dim: c.head_dim,
            };
            dev.rope_kv_write(&mut ws.qkv, &mut self.k_cache[li], &mut self.v_cache[li], &rope).map_err(run_err)?;
            let attn = AttentionArgs {
                q_stride: qkv_dim,
                block_tables: &block_tables,
                max_blocks_per_seq: max_blocks,
                query_seq: &query_seq,
                context_lens: &context_lens,
                window_starts: &window_starts,
                n_queries: n,
                n_heads: c.num_heads,
                n_kv_heads: c.num_kv_heads,
                head_dim: c.head_dim,
                block_size: self.kv.block_size,
                short_rows,
                flash_tiles: (&tile_list, tiles),
            };
            dev.attention(&ws.qkv, &self.k_cache[li], &self.v_cache[li], &mut ws.attn, &mut self.scratch, &attn)
                .map_err(run_err)?;
            project(dev, gemm, gemv, &ws.attn, &layer.o_proj, &mut ws.proj, n, h, qd).map_err(run_err)?;
            dev.add_rmsnorm(
                &mut ws.x,
                Some(&ws.proj),
                &layer.post_attention_layernorm,
                &mut ws.normed,
                n,
                h,
                c.rms_norm_eps,
            )
            .map_err(run_err)?;
            project(dev, gemm, gemv, &ws.normed, &layer.gate_up_proj, &mut ws.gate_up, n, 2 * ffn, h)
                .map_err(run_err)?;
            dev.silu_mul(&ws.gate_up, &mut ws.act, n, ffn).map_err(run_err)?;
            project(dev, gemm, gemv, &ws.act, &layer.down_proj, &mut ws.proj, n, h, ffn).map_err(run_err)?;
        }
        // Final residual add (the norm of every row is a by-product), then the last rows only.
        dev.add_rmsnorm(&mut ws.x, Some(&ws.proj), &self.norm, &mut ws.normed, n, h, c.rms_norm_eps)
            .map_err(run_err)?;
        dev.gather_rows(&ws.x, &last_rows, &mut ws.last_x, nseq, h).map_err(run_err)?;
        dev.add_rmsnorm(&mut ws.last_x, None, &self.norm, &mut ws.last_normed, nseq, h, c.rms_norm_eps)
            .map_err(run_err)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        project(dev, gemm, gemv, &ws.last_normed, head, &mut ws.logits, nseq, c.vocab_size, h).map_err(run_err)?;
        if pick {
            dev.sample(&ws.logits, &pick_rows, nseq, c.vocab_size, &mut ws.next_tokens).map_err(run_err)?;
        }
        Ok(())
    }

    /// Runs one step eagerly (metadata uploaded fresh), picking tokens when `picks` are given.
    fn run_eager(&mut self, chunks: &[SeqChunk<'_>], picks: Option<&[DevicePick]>) -> Result<usize, EngineError> {
        let (mut meta, shape, _) = self.build_meta(chunks, 1)?;
        if shape.n == 0 {
            return Ok(0);
        }
        if let Some(picks) = picks {
            push_sample_rows(&mut meta, picks);
        }
        self.ensure_workspace(shape.n, shape.nseq)?;
        let meta_dev = self.dev.stream().clone_htod(&meta).map_err(|e| run_err(e.into()))?;
        self.enqueue(&meta_dev, shape, picks.is_some())?;
        Ok(shape.nseq)
    }

    /// A decode step (one token per sequence, picked by `picks`) through a captured CUDA graph: the step's
    /// ~400 launches replay as one. Graphs are keyed by batch size and by power-of-two buckets
    /// of the block-table width and context (which fix every launch parameter); a bucket's
    /// first step runs eagerly and is then captured. A graph whose buffers moved is re-captured.
    fn decode_graph_step(&mut self, chunks: &[SeqChunk<'_>], picks: &[DevicePick]) -> Result<(), EngineError> {
        let widest = chunks.iter().map(|ch| ch.block_table.len()).max().unwrap_or(1);
        let (mut meta, mut shape, max_context) = self.build_meta(chunks, widest.next_power_of_two())?;
        push_sample_rows(&mut meta, picks);
        // The split is sized for the context bucket; the kernel stretches the last partition to
        // each query's real end, so any context inside the bucket is computed correctly.
        shape.split =
            attention_split(shape.n * self.config.num_heads, max_context.next_power_of_two(), self.dev.sm_count());
        let stream = self.dev.stream().clone();
        let generation = (self.workspace_generation, self.scratch.generation());
        if let Some(g) = self.graphs.get_mut(&shape)
            && g.generation == generation
        {
            stream.memcpy_htod(&meta, &mut g.meta).map_err(|e| run_err(e.into()))?;
            return g.graph.launch().map_err(run_err);
        }
        // First step of this bucket (or buffers moved): run it eagerly, which also sizes the
        // workspace, the split scratch and the GEMM plans, then capture the same step.
        self.ensure_workspace(shape.n, shape.nseq)?;
        self.scratch
            .reserve(&stream, shape.short_rows * self.config.num_heads * shape.split.0, self.config.head_dim)
            .map_err(run_err)?;
        let graph_meta = stream.clone_htod(&meta).map_err(|e| run_err(e.into()))?;
        self.enqueue(&graph_meta, shape, true)?;
        let generation = (self.workspace_generation, self.scratch.generation());
        // `dev` is shared so the capture can wrap `enqueue`, which borrows the backend mutably.
        let dev = Arc::clone(&self.dev);
        let graph = dev.capture(|| self.enqueue(&graph_meta, shape, true))?.map_err(run_err)?;
        // Graphs whose buffers moved are dead weight; a bounded set covers the batch sizes in use.
        self.graphs.retain(|_, g| g.generation == generation);
        if self.graphs.len() >= MAX_DECODE_GRAPHS {
            self.graphs.clear();
        }
        self.graphs.insert(shape, DecodeGraph { graph, meta: graph_meta, generation });
        Ok(())
    }
}

/// `y (rows, out) = x · wᵀ`: the GEMV kernel where it was timed faster at load (see
/// [`GemvShapes`]), cuBLASLt otherwise.
#[allow(clippy::too_many_arguments)]
fn project(
    dev: &GpuDevice,
    gemm: &Gemm,
    gemv: &GemvShapes,
    x: &CudaSlice<bf16>,
    w: &CudaSlice<bf16>,
    y: &mut CudaSlice<bf16>,
    rows: usize,
    out: usize,
    inner: usize,
) -> Result<(), CudaError> {
    if gemv.preferred(rows, out, inner) {
        dev.gemv(x, w, y, rows, out, inner)
    } else {
        gemm.matmul(x, w, y, rows, out, inner)
    }
}

/// Appends each row's [`SampleRow`] words to the step's metadata (they come last).
fn push_sample_rows(meta: &mut Vec<i32>, picks: &[DevicePick]) {
    for pick in picks {
        let row = match *pick {
            DevicePick::Greedy => SampleRow::GREEDY,
            DevicePick::Draw { inv_temperature, top_k, top_p, min_p, uniform } => {
                SampleRow { inv_temperature, top_k: top_k.unwrap_or(0), top_p, min_p, uniform }
            }
        };
        meta.extend(row.words());
    }
}

/// Most captured decode graphs kept at once (each holds a few hundred launch nodes).
const MAX_DECODE_GRAPHS: usize = 64;

/// What fixes a step's launch parameters (and so keys a captured graph).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct StepShape {
    n: usize,
    nseq: usize,
    max_blocks: usize,
    /// Rows through the CUDA-core attention kernel.
    short_rows: usize,
    /// Tiles through the tensor-core attention kernel.
    tiles: usize,
    split: (usize, usize),
}

impl StepShape {
    /// Length of the short-row list in the metadata: 0 when every row is short (decode steps),
    /// where the kernel needs no list.
    fn listed(&self) -> usize {
        if self.short_rows == self.n { 0 } else { self.short_rows }
    }
}

/// A captured decode step with the metadata buffer its kernels read.
struct DecodeGraph {
    graph: Graph,
    meta: CudaSlice<i32>,
    /// (workspace, scratch) generations at capture.
    generation: (u64, u64),
}

impl ModelBackend for CudaBackend {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn info(&self) -> BackendInfo {
        BackendInfo {
            device: format!("cuda ({})", self.dev.describe()),
            weights_dtype: "bf16".into(),
            weight_bytes_per_step: self.weight_bytes_per_step,
            kv_bytes_per_token: self.config.kv_bytes_per_token(super::CUDA_KV_ELEM_BYTES) as usize,
            tuning: [
                self.timings_source.clone(),
                format!("GEMV launched under the kernel before it: {}", self.dev.launch_overlap()),
            ]
            .into_iter()
            .chain(self.product_timings.iter().map(|t| {
                let kernel = if self.gemv_shapes.preferred(1, t.out, t.inner) { "GEMV" } else { "cuBLASLt" };
                format!(
                    "batch-1 {} ({}x{}): {kernel} (GEMV {:.1} us, cuBLASLt {:.1} us with candidate {})",
                    t.name, t.out, t.inner, t.gemv_us, t.cublas_us, t.cublas_algo
                )
            }))
            .collect(),
        }
    }

    fn forward(&mut self, chunks: &[SeqChunk<'_>]) -> Result<Vec<f32>, EngineError> {
        if chunks.iter().any(|ch| ch.tokens.is_empty()) {
            return Err(EngineError::Internal("empty chunk in a forward batch".into()));
        }
        let nseq = self.run_eager(chunks, None)?;
        if nseq == 0 {
            return Ok(Vec::new());
        }
        let len = nseq * self.config.vocab_size;
        let ws = self.workspace.as_mut().ok_or_else(|| EngineError::Internal("workspace missing".into()))?;
        self.dev.bf16_to_f32(&ws.logits, &mut ws.logits_f32, len).map_err(run_err)?;
        let mut host = self.dev.stream().clone_dtoh(&ws.logits_f32).map_err(|e| run_err(e.into()))?;
        host.truncate(len);
        Ok(host)
    }

    fn forward_pick(&mut self, chunks: &[SeqChunk<'_>], picks: &[DevicePick]) -> Result<Vec<u32>, EngineError> {
        super::check_picks(chunks, picks)?;
        let nseq = chunks.len();
        if nseq == 0 {
            return Ok(Vec::new());
        }
        if chunks.iter().any(|ch| ch.tokens.is_empty()) {
            return Err(EngineError::Internal("empty chunk in a forward batch".into()));
        }
        if chunks.iter().all(|ch| ch.tokens.len() == 1) {
            self.decode_graph_step(chunks, picks)?;
        } else {
            self.run_eager(chunks, Some(picks))?;
        }
        let ws = self.workspace.as_ref().ok_or_else(|| EngineError::Internal("workspace missing".into()))?;
        let mut host = self.dev.stream().clone_dtoh(&ws.next_tokens).map_err(|e| run_err(e.into()))?;
        host.truncate(nseq);
        Ok(host)
    }
}
