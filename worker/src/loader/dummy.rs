//! Seeded random weights for `dummy:<preset>` models.
//!
//! Every tensor is a pure function of (seed, tensor name): the same seed gives the same model on
//! every machine and in every load order. Matrices are uniform in ±1/√in_features (so
//! activations keep their scale through the layers); norm weights are 1.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use xxhash_rust::xxh3::xxh3_64;

use super::weights::WeightSource;
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
    fn load(&self, name: &str, shape: &[usize], dtype: WeightsDtype) -> Result<Tensor, LoadError> {
        let n: usize = shape.iter().product();
        if name.ends_with("norm.weight") {
            return Tensor::from_f32(shape.to_vec(), vec![1.0; n], dtype);
        }
        let fan_in = shape.last().copied().unwrap_or(1).max(1);
        let bound = 1.0 / (fan_in as f32).sqrt();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ xxh3_64(name.as_bytes()));
        let values: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
        Tensor::from_f32(shape.to_vec(), values, dtype)
    }

    fn contains(&self, name: &str) -> bool {
        name != "lm_head.weight" || !self.tied
    }
}
