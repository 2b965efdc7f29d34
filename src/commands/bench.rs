//! `tessera bench …`: speed measured against this machine's own limits, in the same run.

use std::time::Duration;

use clap::{Args, Subcommand};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tessera_kernels::bandwidth::measure_read_bandwidth;
use tessera_worker::engine::{Engine, GenerationRequest, GenerationStats};
use tessera_worker::kv_cache::KvCacheConfig;
use tessera_worker::plan::human_bytes;
use tessera_worker::sampler::SamplingParams;

use super::model_args::ModelArgs;

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Prefill and decode throughput of the CPU engine, with decode compared to the
    /// memory-bandwidth roofline (read bandwidth ÷ bytes read per decoded token).
    Engine(EngineBenchArgs),
}

/// Arguments of `tessera bench engine`.
#[derive(Debug, Args)]
pub struct EngineBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Prompt tokens per sequence (random ids).
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Tokens generated per sequence (end-of-sequence is ignored).
    #[arg(long, default_value_t = 128)]
    gen_len: usize,
    /// Timed runs; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Buffer size of the read-bandwidth measurement, in MiB (well above the last-level cache).
    #[arg(long, default_value_t = 1024)]
    bandwidth_mib: usize,
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
    }
}

fn engine(args: EngineBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.batch > 0 && args.gen_len > 0 && args.prompt_len > 0 && args.runs > 0,
        "batch, lengths and runs must be positive"
    );
    let (resolved, model, pool) = args.model.load()?;
    let config = model.config().clone();
    let weights_per_step = model.weight_bytes_per_token() as f64;
    let kv_per_token = config.kv_bytes_per_token(4) as f64; // f32 KV cache
    let kv = KvCacheConfig::for_sequences(args.batch, args.prompt_len + args.gen_len, 16);
    let mut engine = Engine::new(model, pool, kv)?;

    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let vocab = config.vocab_size as u32;
    let requests: Vec<GenerationRequest> = (0..args.batch)
        .map(|_| GenerationRequest {
            prompt: (0..args.prompt_len).map(|_| rng.random_range(3..vocab.max(4))).collect(),
            max_new_tokens: args.gen_len,
            sampling: SamplingParams::greedy(),
            stop_token_ids: Vec::new(),
        })
        .collect();

    // Warm-up (page in weights, spin up threads), then the bandwidth ceiling, then timed runs.
    let warm: Vec<GenerationRequest> =
        requests.iter().map(|r| GenerationRequest { max_new_tokens: 4, ..r.clone() }).collect();
    engine.generate(&warm, |_, _| {})?;
    let bw = measure_read_bandwidth(engine.pool(), args.bandwidth_mib << 20, 10);
    let mut runs: Vec<GenerationStats> = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        runs.push(engine.generate(&requests, |_, _| {})?.1);
    }

    let prefill = median(runs.iter().map(|s| per_second(s.prefill_tokens, s.prefill_time)).collect());
    let decode = median(runs.iter().map(|s| per_second(s.decode_tokens, s.decode_time)).collect());
    // Average context during decode: the KV read per step grows from prompt_len to prompt_len + gen_len.
    let avg_context = args.prompt_len as f64 + args.gen_len as f64 / 2.0;
    let bytes_per_step = weights_per_step + args.batch as f64 * avg_context * kv_per_token;
    let bytes_per_token = bytes_per_step / args.batch as f64;
    let bw_bytes = bw.best_gb_per_s * 1e9;
    let roofline = bw_bytes / bytes_per_token;

    println!(
        "model                 {} ({} weights, {} threads, {})",
        resolved.id,
        format!("{:?}", engine.model().weights_dtype()).to_lowercase(),
        engine.pool().threads(),
        engine.pool().isa()
    );
    println!(
        "shape                 batch {} × prompt {} + gen {}, {} runs (median)",
        args.batch, args.prompt_len, args.gen_len, args.runs
    );
    println!("prefill               {prefill:.1} tok/s");
    println!("decode                {decode:.1} tok/s (output tokens, all sequences)");
    println!("weights read per step {} ({:.0} bytes)", human_bytes(weights_per_step as u64), weights_per_step);
    println!(
        "bytes read per token  {} (weights ÷ batch + KV at mean context {:.0})",
        human_bytes(bytes_per_token as u64),
        avg_context
    );
    println!(
        "read bandwidth        {:.1} GB/s best, {:.1} GB/s median ({} MiB buffer, same run)",
        bw.best_gb_per_s, bw.median_gb_per_s, args.bandwidth_mib
    );
    println!("roofline decode       {roofline:.1} tok/s (bandwidth ÷ bytes per token)");
    println!("decode / roofline     {:.3}", decode / roofline);
    Ok(())
}
