//! Named model shapes for `dummy:<preset>` models and memory planning.
//!
//! A preset is a `ModelConfig` only; `dummy:` models fill it with seeded random weights. Presets
//! marked `config_only` are too large to materialise on a CPU host (Mistral Large 2 is 123B
//! parameters) and exist for `tessera plan` and GPU sizing.

use tessera_kernels::rope::RopeScaling;

use crate::config::{Architecture, ModelConfig};
use crate::error::LoadError;

/// A named shape.
#[derive(Debug, Clone)]
pub struct Preset {
    /// Name used after `dummy:`.
    pub name: &'static str,
    /// What the shape mirrors.
    pub description: &'static str,
    /// True when weights must not be materialised (only the config is usable).
    pub config_only: bool,
    /// The shape.
    pub config: ModelConfig,
}

/// Every preset, smallest first.
pub fn all() -> Vec<Preset> {
    vec![
        Preset {
            name: "tiny",
            description: "a 2-layer toy Llama for tests",
            config_only: false,
            config: llama(Shape {
                hidden: 64,
                ffn: 128,
                layers: 2,
                heads: 4,
                kv: 2,
                head_dim: 16,
                vocab: 512,
                ctx: 2048,
                theta: 10_000.0,
                tied: true,
            }),
        },
        Preset {
            name: "smollm2-135m",
            description: "SmolLM2-135M's shape (Llama, GQA 9/3)",
            config_only: false,
            config: llama(Shape {
                hidden: 576,
                ffn: 1536,
                layers: 30,
                heads: 9,
                kv: 3,
                head_dim: 64,
                vocab: 49152,
                ctx: 8192,
                theta: 100_000.0,
                tied: true,
            }),
        },
        Preset {
            name: "llama-1b",
            description: "Llama-3.2-1B's shape (GQA 32/8, llama3 RoPE scaling)",
            config_only: false,
            config: ModelConfig {
                rope_scaling: Some(RopeScaling::Llama3 {
                    factor: 32.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192,
                }),
                ..llama(Shape {
                    hidden: 2048,
                    ffn: 8192,
                    layers: 16,
                    heads: 32,
                    kv: 8,
                    head_dim: 64,
                    vocab: 128_256,
                    ctx: 131_072,
                    theta: 500_000.0,
                    tied: true,
                })
            },
        },
        Preset {
            name: "mistral-7b",
            description: "Mistral-7B-v0.3's shape (GQA 32/8, vocab 32768)",
            config_only: false,
            config: mistral(Shape {
                hidden: 4096,
                ffn: 14336,
                layers: 32,
                heads: 32,
                kv: 8,
                head_dim: 128,
                vocab: 32768,
                ctx: 32768,
                theta: 1_000_000.0,
                tied: false,
            }),
        },
        Preset {
            name: "mistral-large-2",
            description: "Mistral-Large-2's shape (123B dense, 88 layers, GQA 96/8)",
            config_only: true,
            config: mistral(Shape {
                hidden: 12288,
                ffn: 28672,
                layers: 88,
                heads: 96,
                kv: 8,
                head_dim: 128,
                vocab: 32768,
                ctx: 131_072,
                theta: 1_000_000.0,
                tied: false,
            }),
        },
    ]
}

/// Looks a preset up by name.
pub fn find(name: &str) -> Result<Preset, LoadError> {
    let presets = all();
    let known = presets.iter().map(|p| p.name).collect::<Vec<_>>().join(", ");
    presets
        .into_iter()
        .find(|p| p.name == name)
        .ok_or_else(|| LoadError::UnknownPreset { name: name.to_string(), known })
}

struct Shape {
    hidden: usize,
    ffn: usize,
    layers: usize,
    heads: usize,
    kv: usize,
    head_dim: usize,
    vocab: usize,
    ctx: usize,
    theta: f32,
    tied: bool,
}

fn llama(s: Shape) -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        hidden_size: s.hidden,
        intermediate_size: s.ffn,
        num_layers: s.layers,
        num_heads: s.heads,
        num_kv_heads: s.kv,
        head_dim: s.head_dim,
        vocab_size: s.vocab,
        max_position_embeddings: s.ctx,
        rms_norm_eps: 1e-5,
        rope_theta: s.theta,
        rope_scaling: None,
        tie_word_embeddings: s.tied,
        sliding_window: None,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

fn mistral(s: Shape) -> ModelConfig {
    ModelConfig { architecture: Architecture::Mistral, ..llama(s) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_mistral_large_matches_spec() {
        for p in all() {
            p.config.validate().unwrap();
        }
        let ml2 = find("mistral-large-2").unwrap().config;
        assert_eq!(
            (ml2.num_layers, ml2.hidden_size, ml2.num_heads, ml2.num_kv_heads, ml2.head_dim),
            (88, 12288, 96, 8, 128)
        );
        assert_eq!((ml2.intermediate_size, ml2.vocab_size, ml2.max_position_embeddings), (28672, 32768, 131_072));
        // 2 (K,V) × 88 layers × 8 KV heads × 128 × 2 bytes = 352 KiB per token in bf16.
        assert_eq!(ml2.kv_bytes_per_token(2), 352 * 1024);
        // ~123B parameters.
        let params = ml2.parameter_count() as f64 / 1e9;
        assert!((params - 122.6).abs() < 1.0, "{params}");
        assert!(find("nope").unwrap_err().to_string().contains("tiny"));
    }
}
