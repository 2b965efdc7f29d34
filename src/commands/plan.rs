//! `tessera plan`: weight and KV memory per rank, and how many tokens of KV fit.

use clap::{Args, ValueEnum};
use tessera_worker::loader;
use tessera_worker::plan::{PlanDtype, PlanRequest, human_bytes, parse_bytes, plan};

use super::model_args::ModelArgs;

/// Storage format in a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PlanDtypeArg {
    /// 4 bytes.
    F32,
    /// 2 bytes.
    Bf16,
    /// 1 byte.
    Fp8,
}

impl From<PlanDtypeArg> for PlanDtype {
    fn from(a: PlanDtypeArg) -> Self {
        match a {
            PlanDtypeArg::F32 => PlanDtype::F32,
            PlanDtypeArg::Bf16 => PlanDtype::Bf16,
            PlanDtypeArg::Fp8 => PlanDtype::Fp8,
        }
    }
}

/// Arguments of `tessera plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Tensor-parallel ranks (GPUs per worker).
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Memory per GPU, e.g. 80GiB, 141GB.
    #[arg(long, value_parser = parse_bytes)]
    gpu_mem: u64,
    /// Weight format.
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: PlanDtypeArg,
    /// KV-cache format (defaults to --dtype).
    #[arg(long, value_enum)]
    kv_dtype: Option<PlanDtypeArg>,
    /// Fraction of GPU memory for weights + KV (the rest is left for activations and the CUDA
    /// context).
    #[arg(long, default_value_t = 0.9)]
    memory_utilization: f64,
}

/// Runs the subcommand.
pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    let (spec, options) = args.model.spec()?;
    let config = loader::resolve_config(&spec, &options)?;
    let request = PlanRequest {
        tp: args.tp,
        device_memory: args.gpu_mem,
        memory_utilization: args.memory_utilization,
        weights_dtype: args.dtype.into(),
        kv_dtype: args.kv_dtype.unwrap_or(args.dtype).into(),
    };
    let p = plan(&config, &request)?;
    println!(
        "model                {} ({}, {:.1}B parameters)",
        args.model.model,
        config.architecture.hf_name(),
        p.parameters as f64 / 1e9
    );
    println!(
        "shape                {} layers, hidden {}, {} heads / {} KV heads × {}, FFN {}, vocab {}",
        config.num_layers,
        config.hidden_size,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.intermediate_size,
        config.vocab_size
    );
    println!(
        "group                tp={} × {} ({:.0}% usable)",
        args.tp,
        human_bytes(args.gpu_mem),
        args.memory_utilization * 100.0
    );
    println!("weights per rank     {} ({:?})", human_bytes(p.weight_bytes_per_rank), args.dtype);
    println!(
        "KV heads per rank    {}{}",
        p.kv_heads_per_rank,
        if p.kv_replicated { " (KV heads replicated: fewer KV heads than ranks)" } else { "" }
    );
    println!(
        "KV per token         {} per rank, {} whole model ({:?})",
        human_bytes(p.kv_bytes_per_token_per_rank),
        human_bytes(p.kv_bytes_per_token_total),
        args.kv_dtype.unwrap_or(args.dtype)
    );
    println!("KV budget per rank   {}", human_bytes(p.kv_budget_per_rank));
    println!(
        "max KV tokens        {} (context {}: {:.1} full-length sequences)",
        p.max_kv_tokens,
        config.max_position_embeddings,
        p.max_kv_tokens as f64 / config.max_position_embeddings as f64
    );
    Ok(())
}
