//! Weights and model config from a GGUF file (llama.cpp's format).
//!
//! GGUF names tensors its own way (`blk.N.attn_q.weight`); this module maps the Hugging Face
//! names the model asks for onto them, dequantises (or, with [`WeightsDtype::Keep`], keeps the
//! file's encoding), and undoes llama.cpp's row permutation of the query/key projections (its
//! converter interleaves the two RoPE halves of every head; we use Hugging Face's `rotate_half`
//! layout; GGUF quantises within rows, so whole encoded rows can be moved). Invariant: a tensor
//! loaded here holds the values `transformers` gets from the same GGUF.

use half::{bf16, f16};
use tessera_kernels::HugePageBuf;
use tessera_kernels::quant::{BlockQ4_0, BlockQ4_1, BlockQ8_0, QuantBlock};

use super::gguf::{GgmlType, GgufFile};
use super::weights::{TensorPart, WeightSource, check_shape};
use crate::config::{Architecture, ModelConfig};
use crate::error::LoadError;
use crate::tensor::{Tensor, TensorData, WeightsDtype};

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
/// `h*d + j*(d/2) + i`, for `d = rows / heads`. A row is `row_len` items (values or, for a tensor
/// kept in its file format, encoded bytes).
fn unpermute_rows<T: Copy>(values: &[T], rows: usize, row_len: usize, heads: usize) -> Vec<T> {
    let d = rows / heads;
    let half = d / 2;
    let mut out = values.to_vec();
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = (h * d + 2 * i + j) * row_len;
                let dst = (h * d + j * half + i) * row_len;
                out[dst..dst + row_len].copy_from_slice(&values[src..src + row_len]);
            }
        }
    }
    out
}

/// Decodes `bytes` (little-endian, `n` items of `size` bytes each) with `decode`, onto huge pages.
fn decode_items<T: Copy>(bytes: &[u8], size: usize, decode: impl Fn(&[u8]) -> T) -> HugePageBuf<T> {
    HugePageBuf::from_fn(bytes.len() / size, |i| decode(&bytes[i * size..(i + 1) * size]))
}

impl GgufWeights {
    /// How many attention heads a row part of `name` holds, when llama.cpp permuted its rows
    /// (the query and key projections); an error if the part splits a head.
    fn permuted_heads(
        &self,
        name: &str,
        gname: &str,
        shape: &[usize],
        part: &TensorPart,
        part_rows: usize,
    ) -> Result<Option<usize>, LoadError> {
        let heads = match gname.rsplit('.').nth(1) {
            Some("attn_q") => self.num_heads,
            Some("attn_k") => self.num_kv_heads,
            _ => return Ok(None),
        };
        let head_rows = shape[0] / heads.max(1);
        let first = match part {
            TensorPart::Rows(r) => r.start,
            _ => 0,
        };
        if head_rows == 0 || !first.is_multiple_of(head_rows) || !part_rows.is_multiple_of(head_rows) {
            return Err(LoadError::InvalidConfig(format!(
                "tensor {name:?}: a shard of rows {part:?} splits an attention head of {head_rows} rows"
            )));
        }
        Ok(Some(part_rows / head_rows))
    }

    /// `part` of matrix `gname` in the file's own encoding, when the kernels read that encoding
    /// and the part keeps whole blocks; `None` otherwise (the caller widens to f32).
    fn load_kept(
        &self,
        gname: &str,
        shape: &[usize],
        part: &TensorPart,
        part_shape: Vec<usize>,
        heads: Option<usize>,
    ) -> Result<Option<Tensor>, LoadError> {
        let (&[rows, cols], Some(info)) = (shape, self.file.tensor_info(gname)) else { return Ok(None) };
        let ty = info.ggml_type;
        let (Some(block), Some(block_bytes)) = (ty.block_size(), ty.block_bytes()) else { return Ok(None) };
        // Both are small constants (≤ 34).
        let (block, block_bytes) = (block as usize, block_bytes as usize);
        let (row_range, col_range) = match part {
            TensorPart::Whole => (0..rows, 0..cols),
            TensorPart::Rows(r) => (r.clone(), 0..cols),
            TensorPart::Cols(c) => (0..rows, c.clone()),
        };
        if !col_range.start.is_multiple_of(block) || !col_range.end.is_multiple_of(block) {
            return Ok(None);
        }
        let (_, span) = self.file.tensor_rows_raw(gname, row_range.clone())?;
        let row_bytes = cols / block * block_bytes;
        let (b0, b1) = (col_range.start / block * block_bytes, col_range.end / block * block_bytes);
        let mut bytes: Vec<u8> = if (b0, b1) == (0, row_bytes) {
            span.to_vec()
        } else {
            span.chunks_exact(row_bytes).flat_map(|r| &r[b0..b1]).copied().collect()
        };
        if let Some(heads) = heads {
            bytes = unpermute_rows(&bytes, row_range.len(), b1 - b0, heads);
        }
        let data = match ty {
            GgmlType::F32 => TensorData::F32(decode_items(&bytes, 4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
            GgmlType::F16 => TensorData::F16(decode_items(&bytes, 2, |b| f16::from_le_bytes([b[0], b[1]]))),
            GgmlType::Bf16 => TensorData::Bf16(decode_items(&bytes, 2, |b| bf16::from_le_bytes([b[0], b[1]]))),
            GgmlType::Q8_0 => TensorData::Q8_0(decode_items(&bytes, BlockQ8_0::BYTES, BlockQ8_0::from_bytes)),
            GgmlType::Q4_0 => TensorData::Q4_0(decode_items(&bytes, BlockQ4_0::BYTES, BlockQ4_0::from_bytes)),
            GgmlType::Q4_1 => TensorData::Q4_1(decode_items(&bytes, BlockQ4_1::BYTES, BlockQ4_1::from_bytes)),
            GgmlType::Other(_) => return Ok(None),
        };
        Tensor::new(part_shape, data).map(Some)
    }
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
        // llama.cpp permutes rows within each head, so a row part must hold whole heads.
        let heads = match part_shape[..] {
            [rows, _] => self.permuted_heads(name, &gname, shape, part, rows)?,
            _ => None,
        };
        if dtype == WeightsDtype::Keep
            && let Some(kept) = self.load_kept(&gname, shape, part, part_shape.clone(), heads)?
        {
            return Ok(kept);
        }
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
        let values = match (heads, &part_shape[..]) {
            (Some(heads), &[rows, cols]) => unpermute_rows(&values, rows, cols, heads),
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
