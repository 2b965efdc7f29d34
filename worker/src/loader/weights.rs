//! The `WeightSource` trait: where a model's tensors come from.
//!
//! Models ask for tensors by their Hugging Face checkpoint name and expected row-major shape;
//! each source (safetensors, GGUF, dummy) maps the name to its own storage, checks the shape and
//! converts to the requested in-memory dtype. Invariant: a returned tensor has exactly the
//! shape of the requested part of the requested full shape, and a source reads (and converts)
//! only that part, so a tensor-parallel rank never holds more than its shard.

use std::ops::Range;

use crate::error::LoadError;
use crate::tensor::{Tensor, WeightsDtype};

/// A provider of named weight tensors.
pub trait WeightSource: Send + Sync {
    /// Loads `part` of `name`, whose full shape must be `shape`, stored as `dtype`.
    fn load_part(
        &self,
        name: &str,
        shape: &[usize],
        part: &TensorPart,
        dtype: WeightsDtype,
    ) -> Result<Tensor, LoadError>;

    /// Loads all of `name` with the expected `shape`, stored as `dtype`.
    fn load(&self, name: &str, shape: &[usize], dtype: WeightsDtype) -> Result<Tensor, LoadError> {
        self.load_part(name, shape, &TensorPart::Whole, dtype)
    }

    /// Whether the source holds `name` (used for optional tensors such as an untied LM head).
    fn contains(&self, name: &str) -> bool;
}

/// Which part of a tensor to load: tensor-parallel ranks load only their shard, never the whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TensorPart {
    /// All of it.
    Whole,
    /// Rows `range` of a matrix (an output-feature shard).
    Rows(Range<usize>),
    /// Columns `range` of every row of a matrix (an input-feature shard).
    Cols(Range<usize>),
}

impl TensorPart {
    /// The shape of this part of a tensor of `shape`, or an error naming `name` when the part
    /// does not fit (out of range, empty, or rows/columns of a non-matrix).
    pub fn shape_of(&self, name: &str, shape: &[usize]) -> Result<Vec<usize>, LoadError> {
        let bad = |what: String| LoadError::InvalidConfig(format!("tensor {name:?} of shape {shape:?}: {what}"));
        match (self, shape) {
            (TensorPart::Whole, _) => Ok(shape.to_vec()),
            (TensorPart::Rows(r), &[rows, cols]) if r.start < r.end && r.end <= rows => Ok(vec![r.len(), cols]),
            (TensorPart::Cols(c), &[rows, cols]) if c.start < c.end && c.end <= cols => Ok(vec![rows, c.len()]),
            (part, _) => Err(bad(format!("cannot take {part:?}"))),
        }
    }

    /// The element ranges of the full row-major tensor of `shape` that make up this part, in
    /// order (call after [`shape_of`](Self::shape_of) accepted it).
    pub fn spans(&self, shape: &[usize]) -> Vec<Range<usize>> {
        let n: usize = shape.iter().product();
        let cols = shape.get(1).copied().unwrap_or(n);
        match self {
            TensorPart::Whole => std::iter::once(0..n).collect(),
            TensorPart::Rows(r) => std::iter::once(r.start * cols..r.end * cols).collect(),
            TensorPart::Cols(c) => {
                let rows = shape.first().copied().unwrap_or(0);
                (0..rows).map(|i| i * cols + c.start..i * cols + c.end).collect()
            }
        }
    }
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
