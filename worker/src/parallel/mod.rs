//! Tensor parallelism: how a model is split over the `N` ranks of one group.
//!
//! The rule (Megatron-style, one all-reduce after attention and one after the MLP):
//! - **attention**: query heads split into `N` equal contiguous ranges (`num_heads % N == 0`);
//!   `q_proj` rows and `o_proj` columns follow them. K/V heads split the same way when
//!   `num_kv_heads % N == 0`; when `N % num_kv_heads == 0` there are fewer K/V heads than ranks,
//!   so each rank holds the one K/V head its query heads use (replicated `N / num_kv_heads`
//!   times, said at start-up). Anything else is refused at start-up.
//! - **MLP**: `gate_proj`/`up_proj` rows and `down_proj` columns split into `N` contiguous ranges
//!   as equal as possible (the intermediate size need not divide by `N`).
//! - **embedding and LM head**: sharded by vocabulary rows in `N` contiguous ranges of
//!   `ceil(vocab / N)` (the last may be shorter). A token's embedding comes from the rank that
//!   holds its row (the others contribute zeros to an all-reduce); logits are all-gathered.
//!   A tied LM head is the same shard as the embedding.
//! - norms are replicated (they are vectors of `hidden_size`).
//!
//! Invariant: the shards of a layout cover every row/column of every tensor exactly once, except
//! replicated K/V heads and norms; so each rank holds about `1/N` of the weights.

pub mod fault;

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use tokio_util::sync::CancellationToken;

use crate::config::ModelConfig;
use crate::error::LoadError;

/// Whether a group has failed, settable from any thread (a rank, the communicator's abort) and
/// awaitable by the server. Invariant: it fails at most once and never recovers; the first
/// reason is kept.
#[derive(Debug, Clone, Default)]
pub struct GroupHealth {
    reason: Arc<OnceLock<String>>,
    failed: CancellationToken,
}

impl GroupHealth {
    /// Marks the group failed (the first reason wins) and wakes every waiter.
    pub fn fail(&self, reason: &str) {
        if self.reason.set(reason.to_string()).is_ok() {
            self.failed.cancel();
        }
    }

    /// Why the group failed, once it has.
    pub fn failure(&self) -> Option<&str> {
        self.reason.get().map(String::as_str)
    }

    /// Resolves with the reason once the group fails.
    pub async fn failed(&self) -> String {
        self.failed.cancelled().await;
        self.failure().unwrap_or("the group failed").to_string()
    }
}

/// What one rank holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpShard {
    /// This rank.
    pub rank: usize,
    /// Ranks in the group.
    pub size: usize,
    /// Query heads (and `o_proj` column blocks).
    pub heads: Range<usize>,
    /// K/V heads held, in the model's numbering.
    pub kv_heads: Range<usize>,
    /// MLP intermediate columns.
    pub ffn: Range<usize>,
    /// Rows of the embedding and LM head.
    pub vocab: Range<usize>,
    /// `ceil(vocab / size)`: the logits every rank contributes to the all-gather (padded).
    pub vocab_shard_len: usize,
}

/// `0..n` split into `parts` contiguous ranges, sizes differing by at most one.
fn even_split(n: usize, parts: usize, i: usize) -> Range<usize> {
    i * n / parts..(i + 1) * n / parts
}

impl TpShard {
    /// The whole model on one rank.
    pub fn single(config: &ModelConfig) -> Self {
        TpShard {
            rank: 0,
            size: 1,
            heads: 0..config.num_heads,
            kv_heads: 0..config.num_kv_heads,
            ffn: 0..config.intermediate_size,
            vocab: 0..config.vocab_size,
            vocab_shard_len: config.vocab_size,
        }
    }

    /// The shards of a `size`-rank group for `config`, or an error saying why this model cannot
    /// be split that way.
    pub fn layout(config: &ModelConfig, size: usize) -> Result<Vec<TpShard>, LoadError> {
        let bad = |why: String| LoadError::InvalidConfig(format!("cannot split the model over --tp {size}: {why}"));
        if size == 0 {
            return Err(bad("the group needs at least one rank".into()));
        }
        let (heads, kv_heads) = (config.num_heads, config.num_kv_heads);
        if !heads.is_multiple_of(size) {
            return Err(bad(format!("{heads} attention heads do not divide into {size} equal parts")));
        }
        if !kv_heads.is_multiple_of(size) && !size.is_multiple_of(kv_heads) {
            return Err(bad(format!(
                "{kv_heads} key/value heads neither divide into {size} parts nor replicate evenly over {size} ranks"
            )));
        }
        if config.intermediate_size < size {
            return Err(bad(format!("the MLP has only {} intermediate columns", config.intermediate_size)));
        }
        let vocab_shard_len = config.vocab_size.div_ceil(size);
        if vocab_shard_len * (size - 1) >= config.vocab_size {
            return Err(bad(format!("the vocabulary of {} leaves a rank without rows", config.vocab_size)));
        }
        let heads_per_rank = heads / size;
        Ok((0..size)
            .map(|rank| {
                let kv = if kv_heads.is_multiple_of(size) {
                    let per = kv_heads / size;
                    rank * per..(rank + 1) * per
                } else {
                    // Every query head of this rank maps to the same K/V head (see the module doc).
                    let group = heads / kv_heads;
                    let kv = rank * heads_per_rank / group;
                    kv..kv + 1
                };
                TpShard {
                    rank,
                    size,
                    heads: rank * heads_per_rank..(rank + 1) * heads_per_rank,
                    kv_heads: kv,
                    ffn: even_split(config.intermediate_size, size, rank),
                    vocab: rank * vocab_shard_len..((rank + 1) * vocab_shard_len).min(config.vocab_size),
                    vocab_shard_len,
                }
            })
            .collect())
    }

    /// How many ranks hold each K/V head (1 unless there are fewer K/V heads than ranks).
    pub fn kv_replication(config: &ModelConfig, size: usize) -> usize {
        if size > config.num_kv_heads { size / config.num_kv_heads.max(1) } else { 1 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(heads: usize, kv: usize, ffn: usize, vocab: usize) -> ModelConfig {
        let mut c = crate::presets::find("tiny").unwrap().config;
        c.num_heads = heads;
        c.num_kv_heads = kv;
        c.intermediate_size = ffn;
        c.vocab_size = vocab;
        c
    }

    #[test]
    fn shards_cover_everything_once() {
        let c = config(8, 4, 172, 512);
        for size in [1, 2, 4, 8] {
            let shards = TpShard::layout(&c, size).unwrap();
            let ffn: usize = shards.iter().map(|s| s.ffn.len()).sum();
            let vocab: usize = shards.iter().map(|s| s.vocab.len()).sum();
            let heads: usize = shards.iter().map(|s| s.heads.len()).sum();
            assert_eq!((ffn, vocab, heads), (172, 512, 8), "size {size}");
            for w in shards.windows(2) {
                assert_eq!(w[0].ffn.end, w[1].ffn.start);
                assert_eq!(w[0].vocab.end, w[1].vocab.start);
            }
        }
    }

    #[test]
    fn fewer_kv_heads_than_ranks_replicates_the_head_each_rank_uses() {
        let c = config(8, 2, 64, 100);
        let shards = TpShard::layout(&c, 4).unwrap();
        // Query heads 0-3 use K/V head 0, 4-7 use head 1.
        let kv: Vec<_> = shards.iter().map(|s| s.kv_heads.clone()).collect();
        assert_eq!(kv, vec![0..1, 0..1, 1..2, 1..2]);
        assert_eq!(TpShard::kv_replication(&c, 4), 2);
    }

    #[test]
    fn impossible_splits_are_refused_with_the_reason() {
        let err = TpShard::layout(&config(9, 3, 64, 100), 2).unwrap_err().to_string();
        assert!(err.contains("9 attention heads"), "{err}");
        let err = TpShard::layout(&config(12, 4, 64, 100), 6).unwrap_err().to_string();
        assert!(err.contains("4 key/value heads"), "{err}");
        assert!(TpShard::layout(&config(8, 8, 64, 100), 0).is_err());
    }
}
