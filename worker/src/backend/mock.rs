//! A backend that computes nothing: for measuring everything around the model (scheduler,
//! gRPC, router) at rates no real model reaches on a CPU.
//!
//! The next token of a sequence is a fixed function of its last token and position, so output
//! is deterministic and batch-independent like a real greedy model's, and never an EOS id (a
//! mock sequence always runs to its token limit). KV storage is not allocated: the engine's block
//! bookkeeping, prefix cache and KV events run exactly as with a real backend.

use crate::backend::{BackendInfo, ModelBackend};
use crate::config::ModelConfig;
use crate::error::EngineError;
use crate::model::SeqChunk;
use crate::sampler::DevicePick;

/// The no-compute backend.
pub struct MockBackend {
    config: ModelConfig,
}

impl MockBackend {
    /// A mock of a model with `config` (vocabulary, context and EOS ids are taken from it).
    pub fn new(config: ModelConfig) -> Self {
        MockBackend { config }
    }

    fn next_token(&self, chunk: &SeqChunk<'_>) -> u32 {
        let vocab = self.config.vocab_size.max(2) as u64;
        let last = chunk.tokens.last().copied().unwrap_or(0) as u64;
        let pos = (chunk.start_pos + chunk.tokens.len()) as u64;
        let mut id = ((last * 7919 + pos * 104_729) % vocab) as u32;
        while self.config.eos_token_ids.contains(&id) {
            id = (id + 1) % vocab as u32;
        }
        id
    }
}

impl ModelBackend for MockBackend {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn info(&self) -> BackendInfo {
        BackendInfo {
            device: "mock (no model compute)".into(),
            weights_dtype: "none".into(),
            weight_bytes_per_step: 0,
            kv_bytes_per_token: 0,
            tuning: Vec::new(),
        }
    }

    fn forward(&mut self, chunks: &[SeqChunk<'_>]) -> Result<Vec<f32>, EngineError> {
        let vocab = self.config.vocab_size;
        let mut logits = vec![0.0f32; chunks.len() * vocab];
        for (row, chunk) in logits.chunks_exact_mut(vocab).zip(chunks) {
            row[self.next_token(chunk) as usize] = 20.0;
        }
        Ok(logits)
    }

    fn forward_pick(&mut self, chunks: &[SeqChunk<'_>], picks: &[DevicePick]) -> Result<Vec<u32>, EngineError> {
        super::check_picks(chunks, picks)?;
        let vocab = self.config.vocab_size;
        Ok(chunks
            .iter()
            .zip(picks)
            .map(|(c, pick)| match pick {
                DevicePick::Greedy => self.next_token(c),
                DevicePick::Draw { .. } => {
                    let mut row = vec![0.0f32; vocab];
                    row[self.next_token(c) as usize] = 20.0;
                    pick.apply(&row)
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_deterministic_and_never_eos() {
        let mut config = crate::presets::find("tiny").unwrap_or_else(|e| panic!("{e}")).config;
        config.eos_token_ids = (0..config.vocab_size as u32).step_by(2).collect();
        let mut b = MockBackend::new(config.clone());
        let table = [0u32];
        let chunk = SeqChunk { tokens: &[5, 6], start_pos: 3, block_table: &table };
        let a = b.forward_pick(&[chunk], &[DevicePick::Greedy]).unwrap_or_default();
        let again = b
            .forward_pick(&[SeqChunk { tokens: &[5, 6], start_pos: 3, block_table: &table }], &[DevicePick::Greedy])
            .unwrap_or_default();
        assert_eq!(a, again);
        assert!(a.iter().all(|t| t % 2 == 1), "{a:?}");
        let logits = b.forward(&[SeqChunk { tokens: &[5, 6], start_pos: 3, block_table: &table }]).unwrap_or_default();
        assert_eq!(crate::sampler::argmax(&logits), a[0]);
    }
}
