//! The model configuration every other part of the worker reads.
//!
//! One `ModelConfig` describes a Llama/Mistral-family decoder, whatever file it came from
//! (Hugging Face `config.json`, GGUF metadata, or a `dummy:` preset). Invariant: a value that
//! passed [`ModelConfig::validate`] has non-zero sizes, `num_heads` divisible by `num_kv_heads`,
//! an even `head_dim`, and `eos_token_ids` within the vocabulary.

use serde_json::Value;
use tessera_kernels::rope::RopeScaling;

use crate::error::LoadError;

/// The supported decoder architectures (same tensors, Mistral adds an optional sliding window).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `LlamaForCausalLM`.
    Llama,
    /// `MistralForCausalLM`.
    Mistral,
}

impl Architecture {
    /// The Hugging Face class name.
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
        }
    }

    fn from_hf_name(name: &str) -> Result<Self, LoadError> {
        match name {
            "LlamaForCausalLM" => Ok(Architecture::Llama),
            "MistralForCausalLM" => Ok(Architecture::Mistral),
            other => Err(LoadError::UnsupportedArchitecture(other.to_string())),
        }
    }
}

/// Shape and hyper-parameters of a Llama/Mistral decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Architecture family.
    pub architecture: Architecture,
    /// Residual stream width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base.
    pub rope_theta: f32,
    /// Optional RoPE frequency scaling.
    pub rope_scaling: Option<RopeScaling>,
    /// Whether the LM head reuses the token embedding.
    pub tie_word_embeddings: bool,
    /// Mistral-style sliding attention window, in tokens.
    pub sliding_window: Option<usize>,
    /// Beginning-of-sequence token, if the model has one.
    pub bos_token_id: Option<u32>,
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Parses a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self, LoadError> {
        let v: Value = serde_json::from_str(text).map_err(|e| LoadError::InvalidConfig(format!("config.json: {e}")))?;
        let arch_name = v["architectures"]
            .as_array()
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .ok_or_else(|| LoadError::InvalidConfig("config.json has no `architectures`".into()))?;
        let architecture = Architecture::from_hf_name(arch_name)?;
        let req = |key: &str| -> Result<usize, LoadError> {
            v[key]
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| LoadError::InvalidConfig(format!("config.json: `{key}` missing or not an integer")))
        };
        let hidden_size = req("hidden_size")?;
        let num_heads = req("num_attention_heads")?;
        let num_kv_heads = v["num_key_value_heads"].as_u64().map_or(num_heads, |x| x as usize);
        let head_dim = match v["head_dim"].as_u64() {
            Some(h) => h as usize,
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        let rope_theta =
            v["rope_theta"].as_f64().or_else(|| v["rope_parameters"]["rope_theta"].as_f64()).unwrap_or(10_000.0) as f32;
        let scaling_json = if v["rope_scaling"].is_object() { &v["rope_scaling"] } else { &v["rope_parameters"] };
        let rope_scaling = parse_rope_scaling(scaling_json)?;
        let cfg = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: req("intermediate_size")?,
            num_layers: req("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: req("vocab_size")?,
            max_position_embeddings: req("max_position_embeddings")?,
            rms_norm_eps: v["rms_norm_eps"].as_f64().unwrap_or(1e-5) as f32,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: v["tie_word_embeddings"].as_bool().unwrap_or(false),
            sliding_window: v["sliding_window"].as_u64().map(|w| w as usize),
            bos_token_id: v["bos_token_id"].as_u64().map(|x| x as u32),
            eos_token_ids: match &v["eos_token_id"] {
                Value::Number(n) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
                Value::Array(a) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
                _ => Vec::new(),
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the invariants stated in the module docs.
    pub fn validate(&self) -> Result<(), LoadError> {
        let bad = |msg: String| Err(LoadError::InvalidConfig(msg));
        for (name, value) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim ({}) must be even for RoPE", self.head_dim));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(format!("rms_norm_eps ({}) must be positive", self.rms_norm_eps));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!("rope_theta ({}) must be positive", self.rope_theta));
        }
        if let Some(id) = self.eos_token_ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return bad(format!("eos_token_id {id} is outside the vocabulary of {}", self.vocab_size));
        }
        if self.sliding_window == Some(0) {
            return bad("sliding_window must be positive".into());
        }
        Ok(())
    }

    /// The RoPE table's configuration (every backend builds its table from this).
    pub fn rope_config(&self) -> tessera_kernels::rope::RopeConfig {
        tessera_kernels::rope::RopeConfig {
            head_dim: self.head_dim,
            theta: self.rope_theta,
            max_positions: self.max_position_embeddings,
            scaling: self.rope_scaling.clone(),
        }
    }

    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Number of parameters (embedding counted once when tied).
    pub fn parameter_count(&self) -> u64 {
        let h = self.hidden_size as u64;
        let per_layer = h * self.q_dim() as u64 // q_proj
            + 2 * h * self.kv_dim() as u64 // k_proj, v_proj
            + self.q_dim() as u64 * h // o_proj
            + 3 * h * self.intermediate_size as u64 // gate, up, down
            + 2 * h; // two norms
        let embed = self.vocab_size as u64 * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + h + self.num_layers as u64 * per_layer
    }

    /// Matmul FLOPs per token (2 per weight of every projection and of the LM head; attention
    /// scores and norms not counted): what a forward pass must do at least, per token.
    pub fn matmul_flops_per_token(&self) -> u64 {
        let h = self.hidden_size as u64;
        let per_layer =
            2 * h * self.q_dim() as u64 + 2 * h * self.kv_dim() as u64 + 3 * h * self.intermediate_size as u64;
        2 * (self.num_layers as u64 * per_layer + self.vocab_size as u64 * h)
    }

    /// Bytes of K and V for one token across all layers, at `bytes_per_elem` per value.
    pub fn kv_bytes_per_token(&self, bytes_per_elem: usize) -> u64 {
        self.kv_bytes_per_token_for_heads(self.num_kv_heads, bytes_per_elem)
    }

    /// The same for `kv_heads` K/V heads (one tensor-parallel rank's share).
    pub fn kv_bytes_per_token_for_heads(&self, kv_heads: usize, bytes_per_elem: usize) -> u64 {
        2 * self.num_layers as u64 * (kv_heads * self.head_dim) as u64 * bytes_per_elem as u64
    }
}

fn parse_rope_scaling(v: &Value) -> Result<Option<RopeScaling>, LoadError> {
    if !v.is_object() {
        return Ok(None);
    }
    let kind = v["rope_type"].as_str().or_else(|| v["type"].as_str()).unwrap_or("default");
    let num = |key: &str| -> Result<f64, LoadError> {
        v[key].as_f64().ok_or_else(|| LoadError::InvalidConfig(format!("rope_scaling `{kind}` needs `{key}`")))
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear { factor: num("factor")? as f32 })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: num("factor")? as f32,
            low_freq_factor: num("low_freq_factor")? as f32,
            high_freq_factor: num("high_freq_factor")? as f32,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        })),
        other => Err(LoadError::InvalidConfig(format!(
            "unsupported rope_scaling type {other:?} (supported: linear, llama3)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stories260k_config() {
        let text = include_str!("../../../shared/models/stories260K/config.json");
        let c = ModelConfig::from_hf_json(text).unwrap();
        assert_eq!((c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim), (64, 5, 8, 4, 8));
        assert!(c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![2]);
    }

    #[test]
    fn parses_smollm2_config_with_rope_parameters() {
        let text = include_str!("../../../shared/models/smollm2-135m-instruct/config.json");
        let c = ModelConfig::from_hf_json(text).unwrap();
        assert_eq!(c.rope_theta, 100_000.0);
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size), (9, 3, 64, 49152));
        assert_eq!(c.rope_scaling, None);
    }

    #[test]
    fn llama3_scaling_and_unknown_arch() {
        let text = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":1,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":10,
            "max_position_embeddings":64,"rope_theta":500000.0,
            "rope_scaling":{"rope_type":"llama3","factor":32.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#;
        let c = ModelConfig::from_hf_json(text).unwrap();
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 32.0));
        let err = ModelConfig::from_hf_json(&text.replace("LlamaForCausalLM", "GPT2LMHeadModel")).unwrap_err();
        assert!(err.to_string().contains("GPT2LMHeadModel"), "{err}");
        let err = ModelConfig::from_hf_json(&text.replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3"))
            .unwrap_err();
        assert!(err.to_string().contains("multiple"), "{err}");
        let err = ModelConfig::from_hf_json(&text.replace("llama3", "yarn")).unwrap_err();
        assert!(err.to_string().contains("yarn"), "{err}");
    }
}
