//! Seeded random weights for `dummy:<preset>` models.
//!
//! Every tensor is a pure function of (seed, tensor name): the same seed gives the same model on
//! every machine and in every load order. Matrices are uniform in ±1/√in_features (so
//! activations keep their scale through the layers); norm weights are 1.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use xxhash_rust::xxh3::xxh3_64;

use super::weights::{TensorPart, WeightSource};
use crate::config::ModelConfig;
use crate::error::LoadError;
use crate::tensor::{Tensor, WeightsDtype};

/// Random weights for a given shape.
pub struct DummyWeights {
    seed: u64,
    tied: bool,
}

impl DummyWeights {
    /// A source for `config` seeded with `seed`.
    pub fn new(config: &ModelConfig, seed: u64) -> Self {
        DummyWeights { seed, tied: config.tie_word_embeddings }
    }
}

impl WeightSource for DummyWeights {
    fn load_part(
        &self,
        name: &str,
        shape: &[usize],
        part: &TensorPart,
        dtype: WeightsDtype,
    ) -> Result<Tensor, LoadError> {
        let part_shape = part.shape_of(name, shape)?;
        let len: usize = part_shape.iter().product();
        if name.ends_with("norm.weight") {
            return Tensor::from_f32(part_shape, vec![1.0; len], dtype);
        }
        let fan_in = shape.last().copied().unwrap_or(1).max(1);
        let bound = 1.0 / (fan_in as f32).sqrt();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ xxh3_64(name.as_bytes()));
        // The whole tensor's stream is drawn in order (so a part equals the same slice of the
        // whole), keeping only the part's values.
        let mut values = Vec::with_capacity(len);
        let mut next = 0;
        for span in part.spans(shape) {
            for _ in next..span.start {
                let _: f32 = rng.random_range(-bound..bound);
            }
            values.extend((span.start..span.end).map(|_| rng.random_range(-bound..bound)));
            next = span.end;
        }
        Tensor::from_f32(part_shape, values, dtype)
    }

    fn contains(&self, name: &str) -> bool {
        name != "lm_head.weight" || !self.tied
    }
}
