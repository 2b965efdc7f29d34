//! Weights and model config from a GGUF file (llama.cpp's format).
//!
//! GGUF names tensors its own way (`blk.N.attn_q.weight`); this module maps the Hugging Face
//! names the model asks for onto them, dequantises, and undoes llama.cpp's row permutation of
//! the query/key projections (its converter interleaves the two RoPE halves of every head; we
//! use Hugging Face's `rotate_half` layout). Invariant: a tensor loaded here equals what
//! `transformers` gets from the same GGUF.

use super::gguf::GgufFile;
use super::weights::{TensorPart, WeightSource, check_shape};
use crate::config::{Architecture, ModelConfig};
use crate::error::LoadError;
use crate::tensor::{Tensor, WeightsDtype};

/// A GGUF file viewed as a weight source.
pub struct GgufWeights {
    file: GgufFile,
    num_heads: usize,
    num_kv_heads: usize,
}

impl GgufWeights {
    /// Wraps an opened file; `config` must come from [`config_from_gguf`] on the same file.
    pub fn new(file: GgufFile, config: &ModelConfig) -> Self {
        GgufWeights { file, num_heads: config.num_heads, num_kv_heads: config.num_kv_heads }
    }

    /// The underlying file.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }
}

/// Translates a Hugging Face tensor name into its GGUF name.
fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let part = match suffix {
        "input_layernorm.weight" => "attn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "post_attention_layernorm.weight" => "ffn_norm",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{part}.weight"))
}

/// Undoes llama.cpp's per-head interleave of rows: GGUF row `h*d + 2i + j` holds Hugging Face row
/// `h*d + j*(d/2) + i`, for `d = rows / heads`.
fn unpermute_rows(values: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let d = rows / heads;
    let half = d / 2;
    let mut out = vec![0.0; values.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = (h * d + 2 * i + j) * cols;
                let dst = (h * d + j * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&values[src..src + cols]);
            }
        }
    }
    out
}

impl WeightSource for GgufWeights {
    fn load_part(
        &self,
        name: &str,
        shape: &[usize],
        part: &TensorPart,
        dtype: WeightsDtype,
    ) -> Result<Tensor, LoadError> {
        let gname = gguf_name(name).ok_or_else(|| LoadError::MissingTensor(name.into()))?;
        let info = self.file.tensor_info(&gname).ok_or_else(|| LoadError::MissingTensor(name.into()))?;
        check_shape(name, &info.shape(), shape)?;
        let part_shape = part.shape_of(name, shape)?;
        let heads = match gname.rsplit('.').nth(1) {
            Some("attn_q") => Some(self.num_heads),
            Some("attn_k") => Some(self.num_kv_heads),
            _ => None,
        };
        let values = match part {
            TensorPart::Whole => self.file.tensor_f32(&gname)?.1,
            TensorPart::Rows(rows) => self.file.tensor_rows_f32(&gname, rows.clone())?.1,
            TensorPart::Cols(cols) => {
                // Row by row: only one full row is ever dequantised beyond the part.
                let mut out = Vec::with_capacity(part_shape.iter().product());
                for r in 0..shape[0] {
                    out.extend_from_slice(&self.file.tensor_rows_f32(&gname, r..r + 1)?.1[cols.clone()]);
                }
                out
            }
        };
        // llama.cpp permutes rows within each head, so a row part must hold whole heads.
        let values = match (heads, &part_shape[..]) {
            (Some(heads), &[rows, cols]) => {
                let head_rows = shape[0] / heads.max(1);
                let first = match part {
                    TensorPart::Rows(r) => r.start,
                    _ => 0,
                };
                if head_rows == 0 || first % head_rows != 0 || rows % head_rows != 0 {
                    return Err(LoadError::InvalidConfig(format!(
                        "tensor {name:?}: a shard of rows {part:?} splits an attention head of {head_rows} rows"
                    )));
                }
                unpermute_rows(&values, rows, cols, rows / head_rows)
            }
            _ => values,
        };
        Tensor::from_f32(part_shape, values, dtype)
    }

    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.file.tensor_info(&g).is_some())
    }
}

/// Reads the model configuration out of GGUF metadata (`general.architecture` = `llama`).
pub fn config_from_gguf(file: &GgufFile) -> Result<ModelConfig, LoadError> {
    let arch = file.meta_str("general.architecture").unwrap_or("<missing>").to_string();
    if arch != "llama" {
        return Err(LoadError::UnsupportedArchitecture(format!("GGUF architecture {arch}")));
    }
    let req = |key: &str| -> Result<usize, LoadError> {
        file.meta_u64(&format!("llama.{key}"))
            .map(|v| v as usize)
            .ok_or_else(|| LoadError::InvalidConfig(format!("GGUF metadata `llama.{key}` missing")))
    };
    let hidden_size = req("embedding_length")?;
    let num_heads = req("attention.head_count")?;
    let num_kv_heads = file.meta_u64("llama.attention.head_count_kv").map_or(num_heads, |v| v as usize);
    let head_dim = match file.meta_u64("llama.attention.key_length") {
        Some(k) => k as usize,
        None if num_heads > 0 => hidden_size / num_heads,
        None => 0,
    };
    let vocab_size = match file.meta_u64("llama.vocab_size") {
        Some(v) => v as usize,
        None => file
            .tensor_info("token_embd.weight")
            .and_then(|t| t.shape().first().copied())
            .ok_or_else(|| LoadError::MissingTensor("token_embd.weight".into()))?,
    };
    let eos = file.meta_u64("tokenizer.ggml.eos_token_id").map(|v| v as u32);
    let config = ModelConfig {
        architecture: Architecture::Llama,
        hidden_size,
        intermediate_size: req("feed_forward_length")?,
        num_layers: req("block_count")?,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size,
        max_position_embeddings: req("context_length")?,
        rms_norm_eps: file.meta_f32("llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        rope_theta: file.meta_f32("llama.rope.freq_base").unwrap_or(10_000.0),
        rope_scaling: match file.meta_str("llama.rope.scaling.type") {
            None | Some("none") => None,
            Some("linear") => Some(tessera_kernels::rope::RopeScaling::Linear {
                factor: file.meta_f32("llama.rope.scaling.factor").unwrap_or(1.0),
            }),
            Some(other) => {
                return Err(LoadError::InvalidConfig(format!("unsupported GGUF rope scaling {other:?}")));
            }
        },
        tie_word_embeddings: file.tensor_info("output.weight").is_none(),
        sliding_window: None,
        bos_token_id: file.meta_u64("tokenizer.ggml.bos_token_id").map(|v| v as u32),
        eos_token_ids: eos.into_iter().collect(),
    };
    config.validate()?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map() {
        assert_eq!(gguf_name("model.layers.12.mlp.down_proj.weight").as_deref(), Some("blk.12.ffn_down.weight"));
        assert_eq!(gguf_name("model.embed_tokens.weight").as_deref(), Some("token_embd.weight"));
        assert_eq!(gguf_name("model.layers.x.mlp.down_proj.weight"), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp's permute: reshape(heads, 2, d/2, cols).swapaxes(1, 2).
        let (heads, d, cols) = (2, 6, 3);
        let rows = heads * d;
        let hf: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let mut gguf = vec![0.0; hf.len()];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..d / 2 {
                    let src = (h * d + j * (d / 2) + i) * cols;
                    let dst = (h * d + i * 2 + j) * cols;
                    gguf[dst..dst + cols].copy_from_slice(&hf[src..src + cols]);
                }
            }
        }
        assert_eq!(unpermute_rows(&gguf, rows, cols, heads), hf);
    }
}
