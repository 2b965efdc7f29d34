//! Memory planning: how a model splits over a tensor-parallel group and how much KV fits.
//!
//! The split is the engine's own, `crate::parallel::TpShard::layout` (its refusals are the
//! plan's); the plan sizes rank 0's shard. It is stricter on one point: MLP columns must divide
//! evenly over the ranks (the engine also runs splits that differ by one column).

use crate::config::ModelConfig;
use crate::error::LoadError;
use crate::parallel::TpShard;

/// Storage format for weights or KV in a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanDtype {
    /// 4 bytes.
    F32,
    /// 2 bytes.
    Bf16,
    /// 1 byte (e4m3).
    Fp8,
}

impl PlanDtype {
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            PlanDtype::F32 => 4,
            PlanDtype::Bf16 => 2,
            PlanDtype::Fp8 => 1,
        }
    }
}

/// What a plan is asked for.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    /// Tensor-parallel ranks.
    pub tp: usize,
    /// Memory per device, in bytes.
    pub device_memory: u64,
    /// Fraction of device memory Tessera may use (weights + KV), like vLLM's
    /// `gpu_memory_utilization`.
    pub memory_utilization: f64,
    /// Weight storage.
    pub weights_dtype: PlanDtype,
    /// KV-cache storage.
    pub kv_dtype: PlanDtype,
}

/// The result, per rank unless named otherwise.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    /// Total parameters.
    pub parameters: u64,
    /// Weight bytes on each rank.
    pub weight_bytes_per_rank: u64,
    /// KV heads held on each rank.
    pub kv_heads_per_rank: usize,
    /// Whether KV heads are replicated (num_kv_heads < tp).
    pub kv_replicated: bool,
    /// KV bytes per token on each rank.
    pub kv_bytes_per_token_per_rank: u64,
    /// KV bytes per token of the whole model (unsharded).
    pub kv_bytes_per_token_total: u64,
    /// Bytes left for KV on each rank.
    pub kv_budget_per_rank: u64,
    /// Tokens of KV that fit (across all sequences).
    pub max_kv_tokens: u64,
}

/// Computes the plan, or explains why the layout is impossible.
pub fn plan(c: &ModelConfig, r: &PlanRequest) -> Result<MemoryPlan, LoadError> {
    let tp = r.tp;
    let bad = |m: String| Err(LoadError::InvalidConfig(m));
    if !(r.memory_utilization > 0.0 && r.memory_utilization <= 1.0) {
        return bad(format!("memory utilization must be in (0, 1], got {}", r.memory_utilization));
    }
    // The engine's own sharding rule (heads, K/V heads and their replication, vocabulary rows).
    let shards = TpShard::layout(c, tp)?;
    let rank0 = &shards[0];
    if !c.intermediate_size.is_multiple_of(tp) {
        return bad(format!("intermediate size {} does not split over tp={tp}", c.intermediate_size));
    }
    let (kv_heads_per_rank, kv_replicated) = (rank0.kv_heads.len(), TpShard::kv_replication(c, tp) > 1);
    let (h, hd) = (c.hidden_size as u64, c.head_dim as u64);
    let q_cols = rank0.heads.len() as u64 * hd;
    let kv_cols = kv_heads_per_rank as u64 * hd;
    let ffn = rank0.ffn.len() as u64;
    let layer_params = h * q_cols + 2 * h * kv_cols + q_cols * h + 3 * h * ffn;
    let vocab_rows = rank0.vocab_shard_len as u64;
    let embed = vocab_rows * h * if c.tie_word_embeddings { 1 } else { 2 };
    let norms = (2 * c.num_layers as u64 + 1) * h;
    let weight_bytes_per_rank = (c.num_layers as u64 * layer_params + embed) * r.weights_dtype.size() + norms * 4;
    let kv_bytes_per_token_per_rank = c.kv_bytes_per_token_for_heads(kv_heads_per_rank, r.kv_dtype.size() as usize);
    let usable = (r.device_memory as f64 * r.memory_utilization) as u64;
    if weight_bytes_per_rank >= usable {
        return bad(format!(
            "weights need {} per rank but only {} is usable; raise --tp or --gpu-mem",
            human_bytes(weight_bytes_per_rank),
            human_bytes(usable)
        ));
    }
    let kv_budget_per_rank = usable - weight_bytes_per_rank;
    Ok(MemoryPlan {
        parameters: c.parameter_count(),
        weight_bytes_per_rank,
        kv_heads_per_rank,
        kv_replicated,
        kv_bytes_per_token_per_rank,
        kv_bytes_per_token_total: c.kv_bytes_per_token(r.kv_dtype.size() as usize),
        kv_budget_per_rank,
        max_kv_tokens: kv_budget_per_rank / kv_bytes_per_token_per_rank.max(1),
    })
}

/// Formats bytes with binary units (`352.0 KiB`, `61.4 GiB`).
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{b} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// Parses sizes like `80GiB`, `80GB`, `512MiB`, `1.5TiB` or a plain byte count.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|ch: char| !(ch.is_ascii_digit() || ch == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kib" | "k" => 1024.0,
        "mib" | "m" => 1024.0f64.powi(2),
        "gib" | "g" => 1024.0f64.powi(3),
        "tib" | "t" => 1024.0f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    if !value.is_finite() || value < 0.0 {
        return Err(format!("invalid size {s:?}"));
    }
    Ok((value * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets;

    #[test]
    fn mistral_large_2_on_8_h100() {
        let c = presets::find("mistral-large-2").unwrap().config;
        let req = PlanRequest {
            tp: 8,
            device_memory: parse_bytes("80GiB").unwrap(),
            memory_utilization: 0.9,
            weights_dtype: PlanDtype::Bf16,
            kv_dtype: PlanDtype::Bf16,
        };
        let p = plan(&c, &req).unwrap();
        assert_eq!(p.kv_bytes_per_token_total, 352 * 1024);
        assert_eq!(p.kv_bytes_per_token_per_rank, 44 * 1024);
        assert_eq!(p.kv_heads_per_rank, 1);
        assert!(!p.kv_replicated);
        // ~245 GB of bf16 weights over 8 ranks.
        let gb = p.weight_bytes_per_rank as f64 / 1e9;
        assert!((gb - 30.7).abs() < 0.5, "{gb}");
        assert_eq!(p.max_kv_tokens, p.kv_budget_per_rank / (44 * 1024));
        // On one 80 GiB GPU the weights do not fit.
        assert!(plan(&c, &PlanRequest { tp: 1, ..req.clone() }).is_err());
        // 96 heads do not split over 5.
        assert!(plan(&c, &PlanRequest { tp: 5, ..req.clone() }).unwrap_err().to_string().contains("96"));
        // tp=16 > 8 KV heads: replicated, one per rank.
        let p16 = plan(&c, &PlanRequest { tp: 16, ..req }).unwrap();
        assert!(p16.kv_replicated);
        assert_eq!(p16.kv_heads_per_rank, 1);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("80GiB").unwrap(), 80 * 1024 * 1024 * 1024);
        assert_eq!(parse_bytes("80GB").unwrap(), 80_000_000_000);
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert!(parse_bytes("80 parsecs").is_err());
        assert_eq!(human_bytes(352 * 1024), "352.0 KiB");
    }
}
