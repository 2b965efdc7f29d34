//! The `WeightSource` trait: where a model's tensors come from.
//!
//! Models ask for tensors by their Hugging Face checkpoint name and expected row-major shape;
//! each source (safetensors, GGUF, dummy) maps the name to its own storage, checks the shape and
//! converts to the requested in-memory dtype. Invariant: a returned tensor has exactly the
//! requested shape.

use crate::error::LoadError;
use crate::tensor::{Tensor, WeightsDtype};

/// A provider of named weight tensors.
pub trait WeightSource: Send + Sync {
    /// Loads `name` with the expected `shape`, stored as `dtype`.
    fn load(&self, name: &str, shape: &[usize], dtype: WeightsDtype) -> Result<Tensor, LoadError>;

    /// Whether the source holds `name` (used for optional tensors such as an untied LM head).
    fn contains(&self, name: &str) -> bool;
}

/// Whether the LM head reuses the embedding: the config says so and the checkpoint has no
/// separate `lm_head.weight` (some tied checkpoints still ship one; then it is used).
pub fn lm_head_is_tied(config: &crate::config::ModelConfig, weights: &dyn WeightSource) -> bool {
    config.tie_word_embeddings && !weights.contains("lm_head.weight")
}

/// Fails with `ShapeMismatch` unless `actual == expected`.
pub(crate) fn check_shape(name: &str, actual: &[usize], expected: &[usize]) -> Result<(), LoadError> {
    if actual == expected {
        Ok(())
    } else {
        Err(LoadError::ShapeMismatch { name: name.to_string(), actual: actual.to_vec(), expected: expected.to_vec() })
    }
}
