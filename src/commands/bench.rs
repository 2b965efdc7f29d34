//! `tessera bench …`: speed measured against this machine's own limits, in the same run.

use std::time::Duration;

use clap::{Args, Subcommand};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tessera_kernels::CpuPool;
use tessera_kernels::bandwidth::measure_read_bandwidth;
use tessera_kernels::peak::measure_fma_peak;
use tessera_worker::engine::{Engine, EngineOptions, GenerationRequest, GenerationStats};
use tessera_worker::kv_cache::KvCacheConfig;
use tessera_worker::plan::human_bytes;
use tessera_worker::sampler::SamplingParams;

use super::model_args::{Device, ModelArgs, ParallelArgs};

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Prefill and decode throughput of the engine, with decode compared to the memory-bandwidth
    /// roofline (read bandwidth ÷ bytes read per decoded token) on the CPU; with
    /// `--concurrency`, closed-loop serving load (throughput, TTFT, ITL, prefix-cache hits).
    Engine(EngineBenchArgs),
    /// Router overhead against mock workers: added latency (p50/p99) at a fixed request rate,
    /// and the most requests/s the router sustains.
    Router(super::bench_router::RouterBenchArgs),
    /// Open-loop multi-tenant, multi-turn chat load against a running router: throughput,
    /// TTFT / ITL / end-to-end percentiles, prefix-cache hit rate, spread over workers.
    Serve(super::bench_serve::ServeBenchArgs),
    /// Routing policies compared on a simulated cluster (multi-tenant multi-turn chat, finite
    /// KV caches, continuous batching) whose router runs the real policy code.
    RouteSim(super::bench_route_sim::RouteSimArgs),
}

/// Arguments of `tessera bench engine`.
#[derive(Debug, Args)]
pub struct EngineBenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub parallel: ParallelArgs,
    /// Sequences decoded together; a comma-separated list runs each size in turn.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    batch: Vec<usize>,
    /// Prompt tokens per sequence (random ids).
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// Tokens generated per sequence (end-of-sequence is ignored).
    #[arg(long, default_value_t = 128)]
    pub gen_len: usize,
    /// Timed runs per batch size; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Buffer size of the CPU read-bandwidth measurement, in MiB (well above the last-level cache).
    #[arg(long, default_value_t = 1024)]
    bandwidth_mib: usize,
    /// Print one JSON object per batch size instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Serving mode: closed-loop clients, each keeping one request in flight; a comma-separated
    /// list runs each level (reports output tok/s, TTFT and ITL percentiles, prefix hit rate).
    #[arg(long, value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Serving mode: tokens of a prefix every prompt shares (before its own `--prompt-len`).
    #[arg(long, default_value_t = 0)]
    pub shared_prefix_len: usize,
    /// Serving mode: requests completed per level (at least twice the concurrency).
    #[arg(long, default_value_t = 16)]
    pub requests: usize,
    /// Serving mode: turn the prefix cache off (to compare).
    #[arg(long)]
    pub no_prefix_cache: bool,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => 0.0,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

fn per_second(count: usize, time: Duration) -> f64 {
    count as f64 / time.as_secs_f64().max(1e-9)
}

/// Runs a benchmark subcommand.
pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Engine(args) => engine(args),
        BenchCommand::Router(args) => super::bench_router::run(args),
        BenchCommand::Serve(args) => super::bench_serve::run(args),
        BenchCommand::RouteSim(args) => super::bench_route_sim::run(&args),
    }
}

fn engine(args: EngineBenchArgs) -> anyhow::Result<()> {
    if !args.concurrency.is_empty() {
        anyhow::ensure!(
            args.concurrency.iter().all(|&c| c > 0) && args.gen_len > 0 && args.prompt_len > 0,
            "concurrency levels and lengths must be positive"
        );
        return super::bench_concurrency::run(&args);
    }
    let max_batch = args.batch.iter().copied().max().unwrap_or(0);
    anyhow::ensure!(
        args.batch.iter().all(|&b| b > 0) && args.gen_len > 0 && args.prompt_len > 0 && args.runs > 0,
        "batch sizes, lengths and runs must be positive"
    );
    let resolved = args.model.resolve()?;
    let config = resolved.config.clone();
    anyhow::ensure!(
        args.prompt_len + args.gen_len <= config.max_position_embeddings,
        "prompt + generation ({}) exceeds the model's context of {}",
        args.prompt_len + args.gen_len,
        config.max_position_embeddings
    );
    let kv = KvCacheConfig::for_sequences(max_batch, args.prompt_len + args.gen_len, 16);
    // Every run repeats the same prompts: without turning the prefix cache off, runs after the
    // first would measure cache hits instead of prefill.
    let mut engine = Engine::with_options(
        args.model.backend(&resolved, kv, &args.parallel)?,
        kv,
        EngineOptions { prefix_caching: false, ..EngineOptions::default() },
    )?;
    let info = engine.backend().info();
    // The CPU ceiling: read bandwidth with as many threads as the engine uses, in this run.
    let (bandwidth, fma_peak) = match args.model.device {
        Device::Cpu => {
            let pool = CpuPool::new(args.model.threads)?;
            (Some(measure_read_bandwidth(&pool, args.bandwidth_mib << 20, 10)), Some(measure_fma_peak(&pool, 10)))
        }
        Device::Cuda => (None, None),
    };
    let flops_per_token = config.matmul_flops_per_token() as f64;

    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let vocab = config.vocab_size as u32;
    for &batch in &args.batch {
        let requests: Vec<GenerationRequest> = (0..batch)
            .map(|_| GenerationRequest {
                prompt: (0..args.prompt_len).map(|_| rng.random_range(3..vocab.max(4))).collect(),
                max_new_tokens: args.gen_len,
                sampling: SamplingParams::greedy(),
                stop_token_ids: Vec::new(),
                min_tokens: 0,
                logprobs: None,
            })
            .collect();
        // Warm-up: page in weights, start threads, compile and cache kernels.
        let warm: Vec<GenerationRequest> =
            requests.iter().map(|r| GenerationRequest { max_new_tokens: args.gen_len.min(4), ..r.clone() }).collect();
        engine.generate(&warm, |_, _| {})?;
        let mut runs: Vec<GenerationStats> = Vec::with_capacity(args.runs);
        for _ in 0..args.runs {
            runs.push(engine.generate(&requests, |_, _| {})?.1);
        }
        let prefill = median(runs.iter().map(|s| per_second(s.prefill_tokens, s.prefill_time)).collect());
        let decode = median(runs.iter().map(|s| per_second(s.decode_tokens, s.decode_time)).collect());
        // KV read per decode step: every sequence reads its whole context; the mean context over
        // the decode steps is prompt_len + gen_len / 2.
        let mean_context = args.prompt_len as f64 + args.gen_len as f64 / 2.0;
        let kv_per_step = batch as f64 * mean_context * info.kv_bytes_per_token as f64;
        let weights_per_step = info.weight_bytes_per_step as f64;
        let bytes_per_token = (weights_per_step + kv_per_step) / batch as f64;
        if args.json {
            let line = serde_json::json!({
                "model": resolved.id, "device": info.device, "weights_dtype": info.weights_dtype,
                "batch": batch, "prompt_len": args.prompt_len, "gen_len": args.gen_len, "runs": args.runs,
                "prefill_tok_s": prefill, "decode_tok_s": decode,
                "weight_bytes_per_step": weights_per_step, "kv_bytes_per_step_mean": kv_per_step,
                "read_bandwidth_gb_s": bandwidth.map(|b| b.best_gb_per_s),
                "prefill_gflop_s": prefill * flops_per_token / 1e9,
                "fma_peak_gflop_s": fma_peak.map(|p| p.best_gflop_per_s),
            });
            println!("{line}");
            continue;
        }
        println!("model                 {} ({} weights, {})", resolved.id, info.weights_dtype, info.device);
        println!(
            "shape                 batch {batch} × prompt {} + gen {}, {} runs (median)",
            args.prompt_len, args.gen_len, args.runs
        );
        let prefill_gflops = prefill * flops_per_token / 1e9;
        println!("prefill               {prefill:.1} tok/s ({prefill_gflops:.1} GFLOP/s in matmuls)");
        if let Some(peak) = fma_peak {
            println!(
                "f32 FMA peak          {:.1} GFLOP/s best, {:.1} median (same run); prefill / peak {:.3}",
                peak.best_gflop_per_s,
                peak.median_gflop_per_s,
                prefill_gflops / peak.best_gflop_per_s
            );
        }
        println!("decode                {decode:.1} tok/s (output tokens, all sequences)");
        println!("weights read per step {} ({weights_per_step:.0} bytes)", human_bytes(weights_per_step as u64));
        println!(
            "bytes read per token  {} (weights ÷ batch + KV at mean context {mean_context:.0})",
            human_bytes(bytes_per_token as u64)
        );
        if let Some(bw) = bandwidth {
            let roofline = bw.best_gb_per_s * 1e9 / bytes_per_token;
            println!(
                "read bandwidth        {:.1} GB/s best, {:.1} GB/s median ({} MiB buffer, same run)",
                bw.best_gb_per_s, bw.median_gb_per_s, args.bandwidth_mib
            );
            println!("roofline decode       {roofline:.1} tok/s (bandwidth ÷ bytes per token)");
            println!("decode / roofline     {:.3}", decode / roofline);
        }
        println!();
    }
    Ok(())
}
