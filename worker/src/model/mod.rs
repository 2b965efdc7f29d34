//! Model architectures. One file per architecture, tensors named as in the checkpoint.
//!
//! The engine sees a model only through [`SeqChunk`] batches in and last-position logits out;
//! paging reaches the model only through `KvCache`.

pub mod llama;

pub use llama::LlamaModel;

/// New tokens of one sequence in a forward batch.
#[derive(Debug, Clone, Copy)]
pub struct SeqChunk<'a> {
    /// Tokens to process, at positions `start_pos..start_pos + tokens.len()`.
    pub tokens: &'a [u32],
    /// Position of the first token (the number already in the KV cache).
    pub start_pos: usize,
    /// The sequence's KV blocks, covering at least `start_pos + tokens.len()` positions.
    pub block_table: &'a [u32],
}
