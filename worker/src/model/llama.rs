//! The Llama / Mistral decoder (`LlamaForCausalLM`, `MistralForCausalLM`).
//!
//! Per layer: RMSNorm → q/k/v projections → RoPE → write K,V into the paged cache → paged
//! causal attention (GQA, optional sliding window) → o_proj → residual; RMSNorm → SwiGLU MLP →
//! residual. Final RMSNorm and the LM head run only on each sequence's last position.
//! Tensor names are the Hugging Face checkpoint's; every source maps onto them.
//!
//! Under tensor parallelism a model holds one rank's [`TpShard`] and runs with that rank's
//! communicator: its query/K/V heads, MLP columns and vocabulary rows only, with the partial
//! results of `o_proj` and `down_proj` all-reduced, the embedding all-reduced (each token's row
//! lives on one rank) and the logits all-gathered. With one rank the collectives are skipped.

use tessera_kernels::activation::{add_assign, silu_mul};
use tessera_kernels::attention::AttentionQuery;
use tessera_kernels::comm::Communicator;
use tessera_kernels::matmul::{InputRounding, matmul, matmul_many, matmul_with};
use tessera_kernels::norm::rms_norm;
use tessera_kernels::rope::{RopeTable, apply_rope};
use tessera_kernels::{CpuPool, WeightMatrix};

use super::SeqChunk;
use crate::backend::cpu::CpuKvStorage;
use crate::config::ModelConfig;
use crate::error::{EngineError, LoadError};
use crate::loader::{TensorPart, WeightSource};
use crate::parallel::TpShard;
use crate::tensor::{Tensor, WeightsDtype};

// Shapes are this rank's: `heads`, `kv_heads`, `ffn` and `vocab` are the shard's counts.
struct Layer {
    input_layernorm: Vec<f32>,          // (hidden)
    q_proj: Tensor,                     // (heads * head_dim, hidden)
    k_proj: Tensor,                     // (kv_heads * head_dim, hidden)
    v_proj: Tensor,                     // (kv_heads * head_dim, hidden)
    o_proj: Tensor,                     // (hidden, heads * head_dim)
    post_attention_layernorm: Vec<f32>, // (hidden)
    gate_proj: Tensor,                  // (ffn, hidden)
    up_proj: Tensor,                    // (ffn, hidden)
    down_proj: Tensor,                  // (hidden, ffn)
}

/// A loaded Llama/Mistral model (or one tensor-parallel rank's shard of it).
pub struct LlamaModel {
    config: ModelConfig,
    shard: TpShard,
    embed_tokens: Tensor, // (vocab, hidden)
    layers: Vec<Layer>,
    norm: Vec<f32>,          // (hidden)
    lm_head: Option<Tensor>, // (vocab, hidden); None = tied to embed_tokens
    rope: RopeTable,
    weights_dtype: WeightsDtype,
}

/// `range` of `0..full` as a tensor part (the whole tensor when it is all of it).
fn rows(range: &std::ops::Range<usize>, full: usize) -> TensorPart {
    if *range == (0..full) { TensorPart::Whole } else { TensorPart::Rows(range.clone()) }
}

fn cols(range: &std::ops::Range<usize>, full: usize) -> TensorPart {
    if *range == (0..full) { TensorPart::Whole } else { TensorPart::Cols(range.clone()) }
}

fn scaled(r: &std::ops::Range<usize>, by: usize) -> std::ops::Range<usize> {
    r.start * by..r.end * by
}

fn mat<'a>(t: &'a Tensor) -> Result<WeightMatrix<'a>, EngineError> {
    // Only fails for a non-2-D tensor, which `load` rules out by checking every shape.
    t.matrix().map_err(|e| EngineError::Internal(e.to_string()))
}

impl LlamaModel {
    /// Builds the whole model from `weights`, storing matrices as `dtype`. `on_layer` is called
    /// after each layer is loaded (for progress reporting).
    pub fn load(
        config: &ModelConfig,
        weights: &dyn WeightSource,
        dtype: WeightsDtype,
        on_layer: impl FnMut(usize),
    ) -> Result<Self, LoadError> {
        Self::load_shard(config, &TpShard::single(config), weights, dtype, on_layer)
    }

    /// Builds one rank's shard: only its parts of each tensor are read (see `crate::parallel`).
    pub fn load_shard(
        config: &ModelConfig,
        shard: &TpShard,
        weights: &dyn WeightSource,
        dtype: WeightsDtype,
        mut on_layer: impl FnMut(usize),
    ) -> Result<Self, LoadError> {
        let c = config;
        let (h, q, kv, ffn, hd) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size, c.head_dim);
        let (q_rows, kv_rows) = (scaled(&shard.heads, hd), scaled(&shard.kv_heads, hd));
        let norm = |name: &str| weights.load(name, &[h], WeightsDtype::F32).map(|t| t.to_f32_vec());
        let vocab_rows = rows(&shard.vocab, c.vocab_size);
        let embed_tokens = weights.load_part("model.embed_tokens.weight", &[c.vocab_size, h], &vocab_rows, dtype)?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let m = |name: &str, shape: [usize; 2], part: TensorPart| {
                weights.load_part(&format!("{p}.{name}"), &shape, &part, dtype)
            };
            layers.push(Layer {
                input_layernorm: norm(&format!("{p}.input_layernorm.weight"))?,
                q_proj: m("self_attn.q_proj.weight", [q, h], rows(&q_rows, q))?,
                k_proj: m("self_attn.k_proj.weight", [kv, h], rows(&kv_rows, kv))?,
                v_proj: m("self_attn.v_proj.weight", [kv, h], rows(&kv_rows, kv))?,
                o_proj: m("self_attn.o_proj.weight", [h, q], cols(&q_rows, q))?,
                post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
                gate_proj: m("mlp.gate_proj.weight", [ffn, h], rows(&shard.ffn, ffn))?,
                up_proj: m("mlp.up_proj.weight", [ffn, h], rows(&shard.ffn, ffn))?,
                down_proj: m("mlp.down_proj.weight", [h, ffn], cols(&shard.ffn, ffn))?,
            });
            on_layer(i);
        }
        let lm_head = if crate::loader::weights::lm_head_is_tied(c, weights) {
            None
        } else {
            Some(weights.load_part("lm_head.weight", &[c.vocab_size, h], &vocab_rows, dtype)?)
        };
        let rope = RopeTable::new(&c.rope_config()).map_err(|e| LoadError::InvalidConfig(e.to_string()))?;
        Ok(LlamaModel {
            config: c.clone(),
            shard: shard.clone(),
            embed_tokens,
            layers,
            norm: norm("model.norm.weight")?,
            lm_head,
            rope,
            weights_dtype: dtype,
        })
    }

    /// Which part of the model this is.
    pub fn shard(&self) -> &TpShard {
        &self.shard
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// How matrices were requested to be stored.
    pub fn weights_dtype(&self) -> WeightsDtype {
        self.weights_dtype
    }

    /// The formats the matrices are actually held in, most bytes first, e.g. `"Q4_1+Q8_0"`.
    pub fn weights_format(&self) -> String {
        let mut by_format: Vec<(&'static str, usize)> = Vec::new();
        for t in self.matrices() {
            match by_format.iter_mut().find(|(f, _)| *f == t.format_name()) {
                Some((_, bytes)) => *bytes += t.bytes(),
                None => by_format.push((t.format_name(), t.bytes())),
            }
        }
        by_format.sort_by_key(|&(_, bytes)| std::cmp::Reverse(bytes));
        by_format.iter().map(|(f, _)| *f).collect::<Vec<_>>().join("+")
    }

    /// Bytes of all weights held in memory.
    pub fn weight_bytes(&self) -> usize {
        let matrices: usize = self.matrices().map(Tensor::bytes).sum();
        let norms: usize =
            self.layers.iter().map(|l| l.input_layernorm.len() + l.post_attention_layernorm.len()).sum::<usize>()
                + self.norm.len();
        matrices + 4 * norms
    }

    /// Every weight matrix held: each layer's projections, the embedding and an untied LM head.
    fn matrices(&self) -> impl Iterator<Item = &Tensor> {
        self.layers
            .iter()
            .flat_map(|l| [&l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj, &l.gate_proj, &l.up_proj, &l.down_proj])
            .chain([&self.embed_tokens])
            .chain(&self.lm_head)
    }

    /// Lays every matrix out as `pool`'s kernels read it fastest ([`Tensor::lay_out_for`]); the
    /// values stay the same.
    pub fn lay_out_for(&mut self, pool: &CpuPool) {
        let layers = self.layers.iter_mut().flat_map(|l| {
            [
                &mut l.q_proj,
                &mut l.k_proj,
                &mut l.v_proj,
                &mut l.o_proj,
                &mut l.gate_proj,
                &mut l.up_proj,
                &mut l.down_proj,
            ]
        });
        for t in layers.chain([&mut self.embed_tokens]).chain(&mut self.lm_head) {
            t.lay_out_for(pool.isa(), pool.input_rounding());
        }
    }

    /// Bytes of weights read to decode one token: every matrix of this shard once, plus one embedding row
    /// (the LM head is read whole; a tied embedding counts once as the LM head).
    pub fn weight_bytes_per_token(&self) -> usize {
        let embed_row = self.embed_tokens.bytes() / self.shard.vocab.len().max(1);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens).bytes();
        self.weight_bytes() - self.embed_tokens.bytes() - self.lm_head.as_ref().map_or(0, Tensor::bytes)
            + head
            + embed_row
    }

    /// Runs `chunks` through the model, writing their K/V into `kv`, and returns the logits of
    /// each chunk's last token, `(chunks.len(), vocab)`. `comm` is this rank's group (every rank
    /// calls this with the same `chunks`); with one rank no collective runs.
    pub fn forward(
        &self,
        pool: &CpuPool,
        comm: &dyn Communicator<Buffer = [f32]>,
        kv: &mut CpuKvStorage,
        chunks: &[SeqChunk<'_>],
    ) -> Result<Vec<f32>, EngineError> {
        let c = &self.config;
        let s = &self.shard;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (heads, kv_heads, ffn) = (s.heads.len(), s.kv_heads.len(), s.ffn.len());
        let (qd, kvd) = (heads * hd, kv_heads * hd);
        let vocab = c.vocab_size;
        let parallel = s.size > 1;
        if chunks.iter().any(|ch| ch.tokens.is_empty()) {
            return Err(EngineError::Internal("empty chunk in a forward batch".into()));
        }
        let n: usize = chunks.iter().map(|ch| ch.tokens.len()).sum();
        if n == 0 {
            return Ok(Vec::new());
        }
        // Token layout: chunks concatenated in order.
        let mut positions = Vec::with_capacity(n);
        for ch in chunks {
            if ch.start_pos + ch.tokens.len() > c.max_position_embeddings {
                return Err(EngineError::ContextOverflow {
                    prompt: ch.start_pos + ch.tokens.len(),
                    max_new: 0,
                    context: c.max_position_embeddings,
                });
            }
            positions.extend((ch.start_pos..ch.start_pos + ch.tokens.len()).map(|p| p as u32));
        }
        let queries: Vec<AttentionQuery<'_>> = chunks
            .iter()
            .flat_map(|ch| {
                (ch.start_pos..ch.start_pos + ch.tokens.len()).map(move |p| AttentionQuery {
                    block_table: ch.block_table,
                    context_len: p + 1,
                    window_start: c.sliding_window.map_or(0, |w| (p + 1).saturating_sub(w)),
                })
            })
            .collect();

        // x: (n, hidden) residual stream. Rows of tokens outside this shard's vocabulary stay
        // zero here and arrive through the all-reduce from the rank that holds them.
        let mut x = vec![0.0f32; n * h];
        let embed = mat(&self.embed_tokens)?;
        for (row, &tok) in x.chunks_exact_mut(h).zip(chunks.iter().flat_map(|ch| ch.tokens.iter())) {
            if tok as usize >= vocab {
                return Err(EngineError::TokenOutOfRange { id: tok, vocab });
            }
            if s.vocab.contains(&(tok as usize)) {
                embed.row_to_f32(tok as usize - s.vocab.start, row);
            }
        }
        if parallel {
            comm.all_reduce_sum(&mut x)?;
        }

        let mut normed = vec![0.0f32; n * h]; // (n, hidden)
        let mut q = vec![0.0f32; n * qd]; // (n, heads * head_dim)
        let mut k = vec![0.0f32; n * kvd]; // (n, kv_heads * head_dim)
        let mut v = vec![0.0f32; n * kvd]; // (n, kv_heads * head_dim)
        let mut attn = vec![0.0f32; n * qd]; // (n, heads * head_dim)
        let mut proj = vec![0.0f32; n * h]; // (n, hidden)
        let mut gate = vec![0.0f32; n * ffn]; // (n, ffn)
        let mut up = vec![0.0f32; n * ffn]; // (n, ffn)
        let mut act = vec![0.0f32; n * ffn]; // (n, ffn)

        for (li, layer) in self.layers.iter().enumerate() {
            rms_norm(pool, &x, &layer.input_layernorm, c.rms_norm_eps, &mut normed)?;
            let (wq, wk, wv) = (mat(&layer.q_proj)?, mat(&layer.k_proj)?, mat(&layer.v_proj)?);
            matmul_many(pool, &normed, n, &mut [(&wq, &mut q), (&wk, &mut k), (&wv, &mut v)])?;
            apply_rope(pool, &self.rope, &mut q, &positions, heads)?;
            apply_rope(pool, &self.rope, &mut k, &positions, kv_heads)?;
            let mut offset = 0;
            for ch in chunks {
                let len = ch.tokens.len();
                let rows = offset * kvd..(offset + len) * kvd;
                kv.write(li, ch.block_table, &positions[offset..offset + len], &k[rows.clone()], &v[rows])?;
                offset += len;
            }
            kv.attention(pool, li, &q, &queries, heads, &mut attn)?;
            matmul(pool, &attn, n, &mat(&layer.o_proj)?, &mut proj)?;
            if parallel {
                comm.all_reduce_sum(&mut proj)?;
            }
            add_assign(&mut x, &proj)?;

            rms_norm(pool, &x, &layer.post_attention_layernorm, c.rms_norm_eps, &mut normed)?;
            let (wg, wu) = (mat(&layer.gate_proj)?, mat(&layer.up_proj)?);
            matmul_many(pool, &normed, n, &mut [(&wg, &mut gate), (&wu, &mut up)])?;
            silu_mul(pool, &gate, &up, &mut act)?;
            matmul(pool, &act, n, &mat(&layer.down_proj)?, &mut proj)?;
            if parallel {
                comm.all_reduce_sum(&mut proj)?;
            }
            add_assign(&mut x, &proj)?;
        }

        // Last position of each chunk → final norm → LM head.
        let mut last = Vec::with_capacity(chunks.len() * h);
        let mut end = 0;
        for ch in chunks {
            end += ch.tokens.len();
            last.extend_from_slice(&x[(end - 1) * h..end * h]);
        }
        let mut last_normed = vec![0.0f32; last.len()]; // (chunks, hidden)
        rms_norm(pool, &last, &self.norm, c.rms_norm_eps, &mut last_normed)?;
        // Logits are read as they are: the LM head's input is never rounded below bf16.
        let head = mat(self.lm_head.as_ref().unwrap_or(&self.embed_tokens))?;
        let rows = chunks.len();
        if !parallel {
            let mut logits = vec![0.0f32; rows * vocab]; // (chunks, vocab)
            matmul_with(pool, &last_normed, rows, &head, &mut logits, InputRounding::Bf16)?;
            return Ok(logits);
        }
        // Each rank's (chunks, shard) logits, padded to the common shard length, gathered
        // rank-major and then interleaved back into (chunks, vocab).
        let (local, padded) = (s.vocab.len(), s.vocab_shard_len);
        let mut part = vec![0.0f32; rows * local];
        matmul_with(pool, &last_normed, rows, &head, &mut part, InputRounding::Bf16)?;
        let mut send = vec![0.0f32; rows * padded];
        for (dst, src) in send.chunks_exact_mut(padded).zip(part.chunks_exact(local)) {
            dst[..local].copy_from_slice(src);
        }
        let mut gathered = vec![0.0f32; s.size * rows * padded];
        comm.all_gather(&send, &mut gathered)?;
        let mut logits = vec![0.0f32; rows * vocab];
        for (rank, block) in gathered.chunks_exact(rows * padded).enumerate() {
            let start = rank * padded;
            let width = padded.min(vocab.saturating_sub(start));
            for (row, src) in block.chunks_exact(padded).enumerate() {
                logits[row * vocab + start..row * vocab + start + width].copy_from_slice(&src[..width]);
            }
        }
        Ok(logits)
    }
}
